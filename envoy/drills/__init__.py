"""Chaos drills side by side: sluice in Envoy, Envoy alone, LiteLLM.

``python -m drills.run`` (or ``cargo xtask drills``) runs them; the drills
are declared in :mod:`drills.catalog`, the systems started by
:mod:`drills.systems`, the numbers computed by :mod:`drills.measure` and the
tables, plots and report written by :mod:`drills.report`. The LiteLLM
peer's settings and their reasons are in ``litellm.yaml`` and ``LITELLM.md``
next to this file; the drill policy is ``policy.toml``.
"""
