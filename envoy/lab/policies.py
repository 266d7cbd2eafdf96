"""Policies the lab's scenario tests start from.

Most scenarios need one backend, ``primary``, serving one model from one
zone (its endpoint is replaced at run time by the lab's llm-sim), tenants
read from ``x-tenant-id``, and the sections under test: :func:`one_backend`
writes that frame once.
"""

from __future__ import annotations


def one_backend(name: str, sections: str, *, model: str = "sim-large") -> str:
    """A policy called ``name``: header tenants, backend ``primary`` serving
    ``model`` in ``zone-a``, then ``sections`` (TOML text) as given."""
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
  endpoints = ["127.0.0.1:18001"]

{sections}"""
