"""Policies the lab's scenario tests start from.

Most scenarios need one backend, ``primary``, serving one model from one
zone (its endpoints are replaced at run time by the lab's llm-sims, one per
endpoint), tenants read from ``x-tenant-id``, and the sections under test:
:func:`one_backend` writes that frame once, and :func:`many_endpoints` the
same frame with several endpoints in the zone, for outlier detection.
"""

from __future__ import annotations


def one_backend(name: str, sections: str, *, model: str = "sim-large") -> str:
    """A policy called ``name``: header tenants, backend ``primary`` serving
    ``model`` in ``zone-a``, then ``sections`` (TOML text) as given."""
    return many_endpoints(name, sections, endpoints=1, model=model)


def many_endpoints(name: str, sections: str, *, endpoints: int = 4,
                   model: str = "sim-large") -> str:
    """:func:`one_backend`'s frame with ``endpoints`` placeholder addresses
    (``127.0.0.1:18001``, ``:18002``…) in ``zone-a``: the lab starts that many
    simulators for the zone (``lab.endpoint_sims("primary", "zone-a")``)."""
    if not 1 <= endpoints <= 999:
        raise ValueError(f"endpoints must be in 1..=999, got {endpoints}")
    hosts = ", ".join(f'"127.0.0.1:{18001 + i}"' for i in range(endpoints))
    return f"""
name = "{name}"

[tenant]
from = "header"
header = "x-tenant-id"

[[backend]]
name = "primary"
models = ["{model}"]
timeout = "60s"

  [[backend.zone]]
  name = "zone-a"
  region = "lab"
  endpoints = [{hosts}]

{sections}"""
