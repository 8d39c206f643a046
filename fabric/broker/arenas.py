"""Drivers' shared-memory arenas, mapped ahead by the idle workers of their host.

A driver on a worker's host copies each large numpy argument into a shared-memory file, the
first of them into its arena. A worker's first read of a file it has not mapped yet faults in
every page (on a VM, ~15-20 ms per 100 MB: half of a first 100 MB call). So a driver says where
its arena is once it is made (ARENA), and the broker has each idle pool worker of that host map
it (MAP_ARENA) before a call needs it: a worker keeps its mappings (``fabric.serde.shm``), and
the next call reads the file as it reads one it mapped before. Only the newest ``KEEP`` arenas
of a host are handed out, as a worker keeps that many mappings; the worker checks the file
itself and may ignore the message, as an optimisation is never needed for a call to run.
"""
from __future__ import annotations

from .. import protocol as P
from ..config import KEEP_MAPPINGS as KEEP  # mappings a worker keeps
from ..errors import ProtocolError

MAX_PATH = 4096


class Arenas:
    """Driver id -> its arena (path, MAP_ARENA's json, host), and who was told of it."""

    def __init__(self, st, out, drivers):
        self.st, self.out, self.drivers = st, out, drivers
        self.by_driver: dict[bytes, tuple[str, bytes, str]] = {}  # oldest first
        self.newest: dict[str, list[tuple[str, bytes]]] = {}  # host -> its newest KEEP, oldest first

    def __bool__(self):
        return bool(self.by_driver)

    def on_arena(self, ident, head, f):
        info = P.loads_json(f[0].bytes) if f else {}
        path, size = info.get("path"), info.get("bytes")
        if not (isinstance(path, str) and 0 < len(path) <= MAX_PATH and type(size) is int and size > 0):
            raise ProtocolError('ARENA needs {"path": a file name, "bytes": its size, a positive whole number}')
        did = ident[1:]
        d = self.drivers.seen(did)
        if not isinstance(d.host, str):
            return  # its host is unknown: no worker can be known to share it
        self.forget(did)
        self.by_driver[did] = (path, P.dumps_json({"path": path, "bytes": size}), d.host)
        self._rank()
        self.share()

    def _rank(self):
        """Each host's newest KEEP arenas: worked out when an arena comes or goes, not per tick."""
        newest: dict[str, list] = {}
        for path, msg, host in reversed(self.by_driver.values()):
            if len(newest.setdefault(host, [])) < KEEP:
                newest[host].append((path, msg))
        self.newest = {host: arenas[::-1] for host, arenas in newest.items()}

    def share(self):
        """MAP_ARENA to each idle pool worker not yet told of the newest arenas of its host."""
        for w in self.st.idle:
            for path, msg in self.newest.get(w.ex.host, ()):
                if path not in w.arenas and not w.doomed:
                    w.arenas.add(path)
                    self.out.send([w.ident, P.C[P.MAP_ARENA], msg])

    def forget(self, did):
        """The driver left (or made a new arena): its arena is no longer handed out."""
        gone = self.by_driver.pop(did, None)
        if gone is not None:
            self._rank()
            for w in self.st.workers.values():
                w.arenas.discard(gone[0])
