"""Hosts for multi-host tests: Linux network namespaces joined by a virtual switch.

``Network(n)`` builds, for one test run::

    namespace <run>-sw:   bridge br0 (the switch; no address)
        |           |           |
      veth        veth        veth          (one pair per host, the peer named eth0 inside)
        |           |           |
    <run>-a       <run>-b     <run>-c       10.213.0.1/24, .2, .3; loopback up in each

where ``<run>`` is ``fabt-<pid of the creating process>-<random hex>``, so two runs never
collide and a run that crashed is recognisable: namespaces whose creator is dead are removed
(with whatever still runs in them) before new ones are made. ``Host.popen``/``Host.run`` run a
command inside a host with ``ip netns exec`` and, through ``unshare --uts``, under a hostname
of its own (``host-a``...), so ``socket.gethostname()`` and ``fabric status`` tell the hosts
apart as they would on real machines. Only the namespaces are touched: nothing is added to
the host's own network stack, so the fixed 10.213.0.0/24 cannot clash with anything.

``network_or_skip()`` raises ``pytest.skip`` with the reason when this machine cannot do it
(not root, no ``ip``/``unshare``, namespaces not permitted as in an unprivileged container).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time

from fabric.config import pid_alive

PREFIX = "fabt"
SUBNET = "10.213.0"  # .1, .2, ... for hosts a, b, ...
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-[a-z]+$")


class Unavailable(Exception):
    """This machine cannot create network namespaces (the reason is the message)."""


def _tool(name):
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}",
                                                   f"/bin/{name}") if os.access(p, os.X_OK)), None)


IP = _tool("ip")
UNSHARE = _tool("unshare")


def _ip(*args, check=True, timeout=20):
    r = subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, [IP, *args], r.stdout, r.stderr)
    return r


_pid_alive = pid_alive


def list_namespaces():
    if IP is None:
        return []
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def kill_namespace(name):
    """SIGKILL everything running in namespace ``name``, then delete it (no error if gone)."""
    for _ in range(5):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "del", name, check=False)


def remove_stale():
    """Remove namespaces left by runs whose creating process is dead. Returns their names."""
    stale = []
    for name in list_namespaces():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            kill_namespace(name)
            stale.append(name)
    return stale


def check_available():
    """Raise ``Unavailable`` saying why namespaces cannot be used here."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        raise Unavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (run the multi-host tests as root)")
    if IP is None:
        raise Unavailable("the `ip` command (iproute2) is not installed")
    if UNSHARE is None:
        raise Unavailable("the `unshare` command (util-linux) is not installed")
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        raise Unavailable(f"`ip netns add` failed (an unprivileged container?): {r.stderr.strip()}")
    try:
        r = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode == 0:
            r = _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if r.returncode != 0:
            raise Unavailable(f"cannot create bridge/veth devices in a namespace: {r.stderr.strip()}")
    finally:
        kill_namespace(probe)


class Host:
    def __init__(self, network, letter, index):
        self.letter = letter
        self.ns = f"{network.run}-{letter}"
        self.hostname = f"host-{letter}"
        self.ip = f"{SUBNET}.{index}"
        self.dev = "eth0"

    def __repr__(self):
        return f"Host({self.hostname}, {self.ip}, netns {self.ns})"

    def argv(self, cmd):
        """``cmd`` as run inside this host: its network namespace, its own hostname."""
        return [IP, "netns", "exec", self.ns, UNSHARE, "--uts", "--", "/bin/sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *cmd]

    def popen(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(cmd), **kw)

    def run(self, cmd, timeout=60, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(cmd), timeout=timeout, **kw)

    def link(self, up: bool):
        """Take this host's only network link down (a pulled cable, seen from the others) or up."""
        _ip("-n", self.ns, "link", "set", self.dev, "up" if up else "down")

    def pids(self):
        return [int(p) for p in _ip("netns", "pids", self.ns, check=False).stdout.split() if p.isdigit()]


class Network:
    """``n`` hosts (``a``, ``b``, ...) on one switch. Use as a context manager, or call
    ``create()`` and, whatever happens, ``destroy()``."""

    def __init__(self, n=3):
        if not 1 <= n <= 26:
            raise ValueError("1 to 26 hosts")
        self.run = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.run}-sw"
        self.hosts = [Host(self, chr(ord("a") + i), i + 1) for i in range(n)]
        self.created = []

    def __getitem__(self, letter):
        return next(h for h in self.hosts if h.letter == letter)

    def create(self):
        remove_stale()
        try:
            for ns in [self.switch] + [h.ns for h in self.hosts]:
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for h in self.hosts:
                port = f"v{h.letter}"
                # made inside the switch's namespace, the peer moved straight into the host's:
                # nothing ever appears in this machine's own namespace
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", h.dev, "netns", h.ns)
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", h.dev)
                _ip("-n", h.ns, "link", "set", h.dev, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self):
        for ns in reversed(self.created):  # hosts first (their processes), the switch last
            kill_namespace(ns)
        self.created.clear()

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.destroy()


def network_or_skip(n=3):
    """A created ``Network``, or ``pytest.skip`` saying why this machine cannot make one."""
    import pytest

    try:
        check_available()
    except Unavailable as e:
        pytest.skip(f"multi-host tests need network namespaces: {e}")
    return Network(n).create()
