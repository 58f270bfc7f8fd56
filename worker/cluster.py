"""Joining Ray: the one place where this project calls `ray.init`.

A local runtime (no address) binds to the loopback interface, 127.0.0.1, so that an embedded
service or `ratebench run` never opens Ray's ports on the machine's network interfaces. A cluster
(an address) is joined from the interface Ray finds for that address, unless
`RATEBENCH_NODE_IP` names the address this node should advertise (a machine with several
interfaces).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["LOOPBACK", "connect"]

LOOPBACK = "127.0.0.1"


def connect(address: str | None, **options: Any) -> None:
    """`ray.init` for a local runtime (`address` None) or a cluster; a no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    node_ip = LOOPBACK if address is None else os.environ.get("RATEBENCH_NODE_IP")
    if node_ip:
        options["_node_ip_address"] = node_ip
    ray.init(address=address, include_dashboard=False, configure_logging=False, **options)
