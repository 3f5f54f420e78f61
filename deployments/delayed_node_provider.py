"""Ray's fake multi-node provider with a cloud's node start-up time: a node launched now joins the cluster
`node_start_delay_s` later (provider config key), as a GPU VM does after provisioning and boot.

Loaded by the head's autoscaler as an external provider (`provider.type: external`, `module:
deployments.delayed_node_provider.DelayedFakeProvider`). The autoscaler launches nodes from its own
launcher threads and counts a launch as pending until it returns, so waiting in `create_node...` is how a
slow provider looks to it: it neither launches the node twice nor sees it before it is up.
"""

from __future__ import annotations

import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class DelayedFakeProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config: dict, cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.node_start_delay_s = float(provider_config.get("node_start_delay_s", 0.0))

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        time.sleep(self.node_start_delay_s)
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
