"""The drivers the broker knows: one typed record each, and joining, rejoining and heartbeats.

A driver is known from its first HELLO (on either of its sockets), from any message after a
broker restart (``rejoin``: it is told to re-send what it waits for), or from a journal record
of one of its calls. It is forgotten when it says BYE or stays silent for ``DRIVER_TIMEOUT``;
what then happens to its calls and instances is the broker's (``Broker.driver_left``).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .. import config
from .. import protocol as P
from .. import settings

log = logging.getLogger("fabric.broker")

DRIVER_TIMEOUT = settings.get().driver_timeout  # a silent driver is gone


@dataclass(eq=False, slots=True)
class Driver:
    since: float = field(default_factory=time.time)       # when it joined (wall clock)
    seen: float = field(default_factory=time.monotonic)   # when it last spoke
    pid: Any = None                 # from its HELLO (unchecked JSON: read with care)
    host: Any = None
    name: Any = None
    worker: Any = None              # hex identity of the worker it runs in (a nested driver)
    dep_asks: dict = field(default_factory=dict)  # Future argument id -> rejoins asked for it
    asked: float = 0.0              # when it was last asked to rejoin for a missing code/argument
    resend: bool = False            # results for it could not be sent: its next heartbeat rejoins it

    def sweep_shm(self):
        """A driver on this host that died (SIGKILL) leaves its shared-memory files: remove them."""
        pid = self.pid
        if isinstance(pid, int) and pid > 0 and self.host == socket.gethostname() and not config.pid_alive(pid):
            config.remove_shm(pid)


class Drivers:
    """Driver id (8 bytes) -> :class:`Driver`, and what is said to drivers as they come and go."""

    def __init__(self, out, epoch: str):
        self.out = out
        self.epoch = epoch                # a driver that sees a new epoch re-sends what it waits for
        self.by_id: dict[bytes, Driver] = {}

    def __contains__(self, did):
        return did in self.by_id

    def __len__(self):
        return len(self.by_id)

    def get(self, did) -> Driver | None:
        return self.by_id.get(did)

    def welcome(self, **extra) -> bytes:
        """WELCOME's JSON to drivers and control clients (``rejoin=True``: re-send what you wait for)."""
        return P.dumps_json({"version": P.VERSION, "broker_pid": os.getpid(), "epoch": self.epoch,
                             "heartbeat": True, **extra})

    def hello(self, did, info):
        d = self.by_id.get(did)
        if d is None:
            d = self.by_id[did] = Driver()
        for k in ("pid", "host", "name", "worker"):
            if k in info:
                setattr(d, k, info[k])
        d.seen = time.monotonic()

    def restored(self, did):
        """A driver with calls in the journal: expected back within DRIVER_TIMEOUT."""
        if did not in self.by_id:
            self.by_id[did] = Driver()

    def rejoin(self, did, d=None) -> Driver:
        """A driver this broker does not know speaks: a broker restart, or a silence that
        dropped it. Take it back, and tell it (WELCOME with ``rejoin``) so it re-sends the calls
        it still waits for; ids this broker already holds are not run twice."""
        if d is None:
            d = self.by_id[did] = Driver()
        log.info("driver %s rejoined", did.hex())
        self.out.send([b"r" + did, P.C[P.WELCOME], self.welcome(rejoin=True)])
        return d

    def seen(self, did) -> Driver:
        """The driver behind a message on its ``d`` socket, taken back if unknown."""
        d = self.by_id.get(did) or self.rejoin(did)
        d.seen = time.monotonic()
        return d

    def heartbeat(self, did, f):
        d = self.by_id.get(did)
        if d is None:
            d = self.rejoin(did)
        elif f and f[0].bytes and f[0].bytes != self.epoch.encode():
            self.rejoin(did, d)  # it knew another broker
        elif d.resend:
            d.resend = False
            self.rejoin(did, d)  # it missed results of this one
        d.seen = time.monotonic()
        # answered on its result socket: how the driver knows this broker is alive (once a
        # second per driver, nothing on the call path; docs/protocol.md, HEARTBEAT)
        self.out.send([b"r" + did, P.C[P.HEARTBEAT], self.epoch.encode()])

    def undelivered(self, did):
        """Results for it could not be sent (gone, or reconnecting to a restarted broker): what was
        kept stays until it asks again, on the rejoin its next heartbeat gets, or its silence."""
        d = self.by_id.get(did)
        if d is not None:
            d.resend = True

    def leave(self, did):
        self.by_id.pop(did, None)

    def silent(self, now):
        """Drivers not heard from for DRIVER_TIMEOUT: (id, record), to be dropped."""
        return [(did, d) for did, d in self.by_id.items() if now - d.seen > DRIVER_TIMEOUT]

    def in_worker(self, wid):
        """Ids of the drivers running inside worker ``wid`` (hex): nested calls' drivers."""
        return [did for did, d in self.by_id.items() if d.worker == wid]
