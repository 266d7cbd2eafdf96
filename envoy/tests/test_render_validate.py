"""Every example policy renders to a bootstrap the real Envoy 1.40 accepts.

``sluice render envoy`` for each ``policies/*.toml`` (with the policy's own
endpoints), then ``envoy --mode validate -c FILE``: Envoy parses the whole
bootstrap, resolves every extension and type URL and checks every field, as
it would at start-up, without opening a port. The render's variants are
checked the same way: the proxy's locality (``--node-zone``) and Envoy's own
zone failover (``--native-failover``: priorities, health checks, outlier
detection, the ``previous_priorities`` retry priority).
"""

from __future__ import annotations

import pytest
import yaml

from lab import paths, render_envoy, validate
from lab.policies import zones
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


FAILOVER_POLICY = zones("failover-render", """
[outlier]

[retry]
max_retries = 1

[failover]
local_zone = "auto"
order = ["zone-c"]
""")


@pytest.mark.parametrize("args", [
    ("--node-zone", "zone-b"),
    ("--native-failover", "--node-zone", "zone-b"),
    ("--native-failover",),
    ("--native-failover", "--native-retry", "--node-zone", "zone-c"),
], ids=["node-zone", "native-failover", "native-failover-no-node-zone", "with-native-retry"])
def test_failover_renders_are_accepted(tmp_path, args):
    policy = tmp_path / "failover.toml"
    policy.write_text(FAILOVER_POLICY)
    text = render_envoy(policy, extra=args)
    doc = yaml.safe_load(text)
    if "--node-zone" in args:
        zone = args[args.index("--node-zone") + 1]
        assert doc["node"]["locality"]["zone"] == zone
    if "--native-failover" in args:
        (cluster,) = doc["static_resources"]["clusters"]
        priorities = sorted(loc["priority"] for loc in cluster["load_assignment"]["endpoints"])
        assert priorities == [0, 1, 2], cluster["load_assignment"]
    bootstrap = tmp_path / "failover.yaml"
    bootstrap.write_text(text)
    result = validate(bootstrap)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
