"""Every example policy renders to a bootstrap the real Envoy 1.40 accepts.

``sluice render envoy`` for each ``policies/*.toml`` (with the policy's own
endpoints), then ``envoy --mode validate -c FILE``: Envoy parses the whole
bootstrap, resolves every extension and type URL and checks every field, as
it would at start-up, without opening a port.
"""

from __future__ import annotations

import pytest

from lab import paths, render_envoy, validate
from lab.render import sluice

POLICIES = sorted(paths.POLICIES_DIR.glob("*.toml"))


def test_there_are_policies_to_check():
    assert POLICIES, f"no policy in {paths.POLICIES_DIR}"
    assert paths.LAB_POLICY in POLICIES or paths.LAB_POLICY.is_file()


@pytest.mark.parametrize("policy", POLICIES, ids=[p.stem for p in POLICIES])
def test_policy_renders_to_a_bootstrap_envoy_accepts(policy, tmp_path):
    checked = sluice("validate", str(policy))
    assert checked.returncode == 0, f"sluice validate {policy.name}:\n{checked.stdout}{checked.stderr}"
    bootstrap = tmp_path / f"{policy.stem}.yaml"
    bootstrap.write_text(render_envoy(policy))
    result = validate(bootstrap)
    assert result.returncode == 0, (
        f"envoy --mode validate rejected the render of {policy.name}:\n"
        f"{result.stdout}\n{result.stderr}")
