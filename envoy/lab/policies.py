"""Policies the lab's scenario tests start from.

Most scenarios need one backend, ``primary``, serving one model from one
zone (its endpoints are replaced at run time by the lab's llm-sims, one per
endpoint), tenants read from ``x-tenant-id``, and the sections under test:
:func:`one_backend` writes that frame once, and :func:`many_endpoints` the
same frame with several endpoints in the zone, for outlier detection, and
:func:`two_zones` the backend spread over ``zone-a`` and ``zone-b``, for
retries and zone outages.
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
    return _frame(name, sections, model, [("zone-a", endpoints)])


def two_zones(name: str, sections: str, *, endpoints: int = 2,
              model: str = "sim-large") -> str:
    """:func:`many_endpoints`' frame with ``endpoints`` placeholder addresses
    in each of ``zone-a`` and ``zone-b`` (one region): the lab starts that
    many simulators per zone (``lab.endpoint_sims("primary", "zone-b")``)."""
    return _frame(name, sections, model, [("zone-a", endpoints), ("zone-b", endpoints)])


def _frame(name: str, sections: str, model: str, zones: list[tuple[str, int]]) -> str:
    blocks = []
    port = 18001
    for zone, endpoints in zones:
        if not 1 <= endpoints <= 999:
            raise ValueError(f"endpoints must be in 1..=999, got {endpoints}")
        hosts = ", ".join(f'"127.0.0.1:{port + i}"' for i in range(endpoints))
        port += endpoints
        blocks.append(f"""
  [[backend.zone]]
  name = "{zone}"
  region = "lab"
  endpoints = [{hosts}]
""")
    return f"""
name = "{name}"

[tenant]
from = "header"
header = "x-tenant-id"

[[backend]]
name = "primary"
models = ["{model}"]
timeout = "60s"
{"".join(blocks)}
{sections}"""
