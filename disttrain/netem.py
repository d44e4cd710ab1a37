"""An emulated network of rate-limited hosts, built from Linux network namespaces.

Each worker runs as a host in its own network namespace; a veth pair joins
the host's ``eth0`` to a bridge in a separate bridge namespace, and a token
bucket on ``eth0`` limits what the host can send::

    H0 eth0 ─veth─ p0 ┐
    H1 eth0 ─veth─ p1 ┼─ br0   (bridge namespace)
    ...               ┘
    tc qdisc add dev eth0 root tbf rate R burst R*1ms latency 50ms   (in every Hi)

The burst is one millisecond at the line rate (measured here: a
small burst such as 32 kbit caps throughput far below the rate).  The kernel
here has no ``netem`` qdisc, so there is *no per-message latency* on these
links: latency is modelled in ``disttrain.costmodel`` only.

Safety: only private addresses of one /24 (``10.213.0.0/24`` by default)
inside the namespaces created here are ever assigned; nothing is routed out
of them, and workers only ever connect to worker 0's address in that subnet.
Namespace names start with a per-run id, so parallel runs do not collide,
and everything is deleted on exit, on an exception and on SIGINT/SIGTERM
(``EmulatedNetwork`` is a context manager; ``handle_signals`` turns the
signals into exceptions so ``finally`` blocks run).

Needs root and iproute2 (``ip``, ``tc``); ``unavailable_reason()`` says why
not, and ``EmulatedNetwork`` raises ``NetemUnavailable`` with that reason.

Example::

    with handle_signals(), EmulatedNetwork(2, "1gbit") as net:
        subprocess.run(net.exec_prefix(1) + ["python", "-c", "..."])   # runs inside host 1
        print(net.tx_bytes(1))                                      # bytes sent by host 1's eth0
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
NET_CHOICES = ("none", "100mbit", "1gbit", "10gbit")


class NetemUnavailable(RuntimeError):
    """This machine or user cannot build the emulated network."""


def parse_rate(rate: str) -> float:
    """``"1gbit"`` -> 1e9 bits per second (tc's decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?bit)\s*", str(rate).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"net rate {rate!r}: give a positive number with a unit bit, kbit, mbit or "
                         f"gbit, e.g. 100mbit, 1gbit, 10gbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


def unavailable_reason(euid: int | None = None) -> str | None:
    """Why the emulated network cannot be built here, or None if it can."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return (f"network emulation needs root (network namespaces, veth, tc); running as uid {euid}. "
                f"Run as root, or choose --net none")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return (f"network emulation needs iproute2 ({' and '.join(missing)} not found on PATH). "
                f"Install iproute2, or choose --net none")
    return None


def check_available(euid: int | None = None) -> None:
    reason = unavailable_reason(euid)
    if reason:
        raise NetemUnavailable(reason)


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str  # eth0's address inside the namespace


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetemUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


class EmulatedNetwork:
    """``hosts`` namespaces on one bridge, each limited to ``rate`` outgoing.

    Args:
        hosts: number of hosts (one per worker).
        rate: tc rate, e.g. ``"1gbit"``.
        run_id: name prefix of the namespaces (default: a fresh random one).
        subnet: a private /24 the hosts' addresses come from (host i gets .i+1).
    """

    def __init__(self, hosts: int, rate: str, run_id: str | None = None,
                 subnet: str = "10.213.0.0/24") -> None:
        if not isinstance(hosts, int) or not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be an integer in [1, 250], got {hosts!r}")
        self.rate_bps = parse_rate(rate)
        self.rate = rate
        net = ipaddress.ip_network(subnet)
        if not net.is_private or net.prefixlen != 24:
            raise ValueError(f"subnet {subnet!r} must be a private /24 (e.g. 10.213.0.0/24)")
        self.run_id = run_id or f"dt{os.getpid()}{secrets.token_hex(2)}"
        self.burst_bytes = max(int(self.rate_bps / 8 * 1e-3), 3000)  # 1 ms at line rate, >= 2 MTU
        self.latency_limit = "50ms"  # tbf's queueing limit, not an added delay
        self.bridge = f"{self.run_id}-br"
        self.hosts = [Host(f"{self.run_id}-h{i}", str(net.network_address + i + 1)) for i in range(hosts)]
        self._created: list[str] = []

    # -- life cycle --------------------------------------------------------
    def __enter__(self) -> "EmulatedNetwork":
        check_available()
        try:
            self._add_namespace(self.bridge)
            _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                self._add_host(i, host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _add_host(self, i: int, host: Host) -> None:
        ns, port = host.namespace, f"p{i}"
        self._add_namespace(ns)
        _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port)
        _run("ip", "-n", ns, "link", "set", port, "netns", self.bridge)
        _run("ip", "-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
             "rate", self.rate, "burst", str(self.burst_bytes), "latency", self.latency_limit)

    def close(self) -> None:
        """Delete every namespace this network made (their veths and the bridge go with them)."""
        while self._created:
            name = self._created.pop()
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    # -- use ---------------------------------------------------------------
    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside host ``i``."""
        return ["ip", "netns", "exec", self.hosts[i].namespace]

    def tx_bytes(self, i: int) -> int:
        """Bytes host ``i``'s eth0 qdisc has sent (headers included), from ``tc -s qdisc``."""
        out = _run("ip", "netns", "exec", self.hosts[i].namespace, "tc", "-s", "qdisc", "show", "dev", "eth0")
        match = re.search(r"Sent (\d+) bytes", out)
        if not match:
            raise NetemUnavailable(f"no byte count in tc's output for host {i}: {out.strip()!r}")
        return int(match.group(1))

    def settings(self) -> dict:
        """What the emulation was, for the results table."""
        return {"rate": self.rate, "rate_bps": self.rate_bps, "burst_bytes": self.burst_bytes,
                "tbf_latency_limit": self.latency_limit, "added_latency_s": 0.0,
                "mtu": 1500, "hosts": len(self.hosts), "subnet_host0": self.hosts[0].address}


def namespaces() -> list[str]:
    """Names of the network namespaces that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@contextmanager
def handle_signals():
    """Turn SIGINT and SIGTERM into exceptions for the block, so cleanup in ``finally`` runs."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
