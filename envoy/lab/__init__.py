"""sluice's Envoy lab: real Envoy 1.40 in front of llm-sim upstreams.

The pieces, each usable alone:

- :mod:`lab.procs`: child processes that always stop (process groups,
  parent-death signal, atexit and signal handlers, leftover detection);
- :mod:`lab.llmsim`: an llm-sim instance and its control port;
- :mod:`lab.envoyproc`: an Envoy process, its admin API and ``--mode validate``;
- :mod:`lab.render`: bootstraps rendered from policies by ``sluice render envoy``;
- :mod:`lab.lab`: the whole lab for one policy.

Every address is on 127.0.0.1 and every port is chosen by the OS at run time.
"""

from .envoyproc import Envoy, validate
from .lab import Lab
from .llmsim import LlmSim
from .procs import ManagedProcess, install_cleanup_handlers, stop_all, survivors
from .render import add_wasm_filter, policy_zones, render_envoy, wasm_filter

__all__ = [
    "Envoy",
    "Lab",
    "LlmSim",
    "ManagedProcess",
    "add_wasm_filter",
    "install_cleanup_handlers",
    "policy_zones",
    "render_envoy",
    "stop_all",
    "survivors",
    "validate",
    "wasm_filter",
]
