"""Policies the lab's scenario tests start from.

Most scenarios need one backend, ``primary``, serving one model from one
zone (its endpoints are replaced at run time by the lab's llm-sims, one per
endpoint), tenants read from ``x-tenant-id``, and the sections under test:
:func:`one_backend` writes that frame once, and :func:`many_endpoints` the
same frame with several endpoints in the zone, for outlier detection,
:func:`two_zones` the backend spread over ``zone-a`` and ``zone-b``, for
retries and zone outages, and :func:`zones` any layout of zones in regions,
for zone and region failover.
"""

from __future__ import annotations

#: One zone of a layout: its name, its region, how many endpoints it lists.
ZoneLayout = tuple[str, str, int]

#: Two zones of two endpoints in one region and a third zone in another.
REGIONS_LAYOUT: list[ZoneLayout] = [
    ("zone-a", "region-1", 2),
    ("zone-b", "region-1", 2),
    ("zone-c", "region-2", 2),
]


def one_backend(name: str, sections: str, *, model: str = "sim-large") -> str:
    """A policy called ``name``: header tenants, backend ``primary`` serving
    ``model`` in ``zone-a``, then ``sections`` (TOML text) as given."""
    return many_endpoints(name, sections, endpoints=1, model=model)


def many_endpoints(name: str, sections: str, *, endpoints: int = 4,
                   model: str = "sim-large") -> str:
    """:func:`one_backend`'s frame with ``endpoints`` placeholder addresses
    (``127.0.0.1:18001``, ``:18002``…) in ``zone-a``: the lab starts that many
    simulators for the zone (``lab.endpoint_sims("primary", "zone-a")``)."""
    return _frame(name, sections, model, [("zone-a", "lab", endpoints)])


def two_zones(name: str, sections: str, *, endpoints: int = 2,
              model: str = "sim-large") -> str:
    """:func:`many_endpoints`' frame with ``endpoints`` placeholder addresses
    in each of ``zone-a`` and ``zone-b`` (one region): the lab starts that
    many simulators per zone (``lab.endpoint_sims("primary", "zone-b")``)."""
    return _frame(name, sections, model,
                  [("zone-a", "lab", endpoints), ("zone-b", "lab", endpoints)])


def zones(name: str, sections: str, *, layout: list[ZoneLayout] | None = None,
          model: str = "sim-large", api: str | None = None,
          zone_keys: dict[str, str] | None = None) -> str:
    """:func:`two_zones`' frame with the zones of ``layout`` (name, region,
    endpoints; default :data:`REGIONS_LAYOUT`: ``zone-a`` and ``zone-b`` in
    ``region-1``, ``zone-c`` in ``region-2``, two endpoints each), in that
    order. ``api`` sets the backend's ``api`` (``"anthropic"``: sluice's own
    answers take Anthropic's shape; llm-sim serves both APIs anyway);
    ``zone_keys[zone]`` is TOML added to that zone's table, e.g.
    ``'requests_per_minute = 600'``."""
    layout = REGIONS_LAYOUT if layout is None else layout
    names = [zone for zone, _, _ in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"zone names repeat in {names}")
    unknown = set(zone_keys or {}) - set(names)
    if unknown:
        raise ValueError(f"zone_keys names zones not in the layout: {sorted(unknown)}")
    return _frame(name, sections, model, layout, api=api, zone_keys=zone_keys)


def _frame(name: str, sections: str, model: str, layout: list[ZoneLayout], *,
           api: str | None = None, zone_keys: dict[str, str] | None = None) -> str:
    blocks = []
    port = 18001
    for zone, region, endpoints in layout:
        if not 1 <= endpoints <= 999:
            raise ValueError(f"endpoints must be in 1..=999, got {endpoints}")
        hosts = ", ".join(f'"127.0.0.1:{port + i}"' for i in range(endpoints))
        port += endpoints
        extra = (zone_keys or {}).get(zone)
        blocks.append(f"""
  [[backend.zone]]
  name = "{zone}"
  region = "{region}"
  endpoints = [{hosts}]
""" + (f"  {extra}\n" if extra else ""))
    api_line = f'api = "{api}"\n' if api else ""
    return f"""
name = "{name}"

[tenant]
from = "header"
header = "x-tenant-id"

[[backend]]
name = "primary"
{api_line}models = ["{model}"]
timeout = "60s"
{"".join(blocks)}
{sections}"""
