"""Test hook: `backhaul` whose relay names a node and lists nodes in every tunnel's hello.

The relay's hello carries ``node`` (its node id) and ``nodes`` (the up nodes) once the
store lists the nodes (relay/worker.py reads ``settings.node_id`` and ``self.nodes``).
A test of the connector's side feeds them here, without the store: BACKHAUL_TEST_NODE_ID
is this relay's node id, BACKHAUL_TEST_NODES a JSON file holding the list, read again for
every tunnel so a test can change it. Run as ``python node_hook.py service run ...``;
the relay's workers are forked, so they inherit the patch.
"""

from __future__ import annotations

import json
import os
import sys

from backhaul.cli import main
from backhaul.relay import worker


def _install(node_id: str, nodes_file: str) -> None:
    original = worker.RelayWorker.tunnel_up

    def tunnel_up(self, tunnel) -> None:
        if getattr(self.settings, "node_id", None) is None:
            object.__setattr__(self.settings, "node_id", node_id)  # the settings are a frozen dataclass
        with open(nodes_file, "rb") as f:
            self.nodes = json.load(f)
        original(self, tunnel)

    worker.RelayWorker.tunnel_up = tunnel_up


if __name__ == "__main__":
    _install(os.environ["BACKHAUL_TEST_NODE_ID"], os.environ["BACKHAUL_TEST_NODES"])
    sys.exit(main(sys.argv[1:]))
