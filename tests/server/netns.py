"""Separate hosts on one machine: one Linux network namespace per party, joined by a bridge.

Each namespace gets a veth pair (``eth0`` inside, the other end on a bridge in the root
namespace) and its own address in a private /24; the root namespace, where the operator's
client and the packet capture run, holds the bridge's address. Needs root (or CAP_NET_ADMIN)
and iproute2; :func:`make_hosts` returns ``None`` with the reason when namespaces cannot be
created, so callers can fall back to distinct loopback addresses and say so.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess


@dataclasses.dataclass
class NetnsHosts:
    tag: str
    bridge: str
    addresses: dict[str, str]  # name -> IPv4 address inside its namespace
    namespaces: dict[str, str]  # name -> namespace

    def close(self) -> None:
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


def make_hosts(names: list[str], *, subnet: int = 77) -> tuple[NetnsHosts | None, str]:
    """Namespaces ``sfw<pid>-<i>`` with addresses 10.<subnet>.<pid % 200>.(11+i); (hosts, "") or
    (None, why)."""
    if shutil.which("ip") is None:
        return None, "iproute2 (`ip`) is not installed"
    tag = f"sfw{os.getpid() % 100000}"
    third = os.getpid() % 200 + 1
    hosts = NetnsHosts(tag=tag, bridge=f"br-{tag}", addresses={}, namespaces={})
    try:
        _ip("link", "add", hosts.bridge, "type", "bridge")
        _ip("addr", "add", f"10.{subnet}.{third}.1/24", "dev", hosts.bridge)
        _ip("link", "set", hosts.bridge, "up")
        for i, name in enumerate(names):
            ns, veth = f"{tag}-{i}", f"v{tag}-{i}"
            _ip("netns", "add", ns)
            hosts.namespaces[name] = ns
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", hosts.bridge, "up")
            addr = f"10.{subnet}.{third}.{11 + i}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.addresses[name] = addr
    except OSError as exc:
        hosts.close()
        return None, str(exc)
    return hosts, ""
