"""PLACEHOLDER: this file was overwritten by mistake.

The breaker engineer's session wrote its own benchmark to this path at
23:12 UTC without noticing that the lead's untracked harness (wrk-based,
variants none/noop/local_ratelimit/tokens/breaker, streaming and not; see
benches/envoy-cpu.md) already lived here. The original content is lost from
disk; please re-create it from your session. The breaker's own script is now
benches/breaker_cpu.py. Sorry.
"""

import sys

sys.exit(__doc__)
