"""Keep a Ray started on this machine on the loopback address.

Ray replaces a node address of 127.0.0.1 with the machine's network address
(``ray._private.services.resolve_ip_for_localhost``), so ``ray.init(
_node_ip_address="127.0.0.1")`` alone still binds the raylet and object manager
to the network interface. Ray skips that replacement when its multi-machine
switch, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (read once, when ray is imported;
the name is historical, it applies on Linux too), is off. Only for processes
that start their own local Ray: a driver joining a multi-machine cluster must
keep it on.
"""

from __future__ import annotations

import os
import sys

SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: the given address, else ``RAY_ADDRESS`` (set by ``ray job
    submit`` and on cluster nodes); None means: start a local Ray, on loopback."""
    return address or os.environ.get("RAY_ADDRESS") or None


def keep_local_ray_on_loopback() -> bool:
    """Turn the switch off unless set; False if ray was imported too early to obey.

    A Ray kept on this machine also sends no usage statistics unless asked to.
    """
    os.environ.setdefault(SWITCH, "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return "ray" not in sys.modules
