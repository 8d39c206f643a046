"""What the broker sends, and when: at once, or batched per peer for the end of the loop turn.

Why batch: a burst of SUBMITs from one driver produces many CALLs for one worker and many
RESULTs for one driver in the same loop turn; they go as one message per peer (a BATCH when
there are several), which costs one send and one wake-up on the other side instead of many.
``flush`` runs once per loop turn, after the journal is on disk.
"""
from __future__ import annotations

import zmq

from .. import protocol as P


def call_id_of(msg) -> bytes:
    """The call id of a queued CALL or RESULT message (its first frame: command + header)."""
    if msg[0][:4] == P.C[P.CALL]:
        return P.CallHeader.read(msg[0][4:]).call_id
    return P.ResultHeader.read(msg[0], 4).call_id


class Outbox:
    __slots__ = ("sock", "to_drivers", "to_workers")

    def __init__(self, sock):
        self.sock = sock
        self.to_drivers: dict[bytes, list] = {}     # results made this loop turn, per driver socket
        self.to_workers: dict[object, list] = {}    # calls dispatched this loop turn, per Worker

    def send(self, frames) -> bool:
        """Send now; False when that peer is gone (EHOSTUNREACH)."""
        try:
            P.send(self.sock, frames)
            return True
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False

    def to_driver(self, rid, msg):
        """``msg`` (frames without the identity) for driver socket ``rid``, with this turn's batch."""
        self.to_drivers.setdefault(rid, []).append(msg)

    def to_worker(self, w, msg):
        self.to_workers.setdefault(w, []).append(msg)

    def drop_worker(self, w):
        """Forget what was queued for ``w`` (not sent: its calls are requeued by the caller)."""
        return self.to_workers.pop(w, None)

    def _send_all(self, ident, msgs) -> bool:
        if len(msgs) == 1:
            return self.send([ident, *msgs[0]])
        return self.send([ident, P.C[P.BATCH], *[p for m in msgs for p in m]])

    def flush_worker(self, w):
        """Send what is queued for ``w`` now (a call that must travel alone keeps FIFO order)."""
        msgs = self.to_workers.pop(w, None)
        if msgs:
            self._send_all(w.ident, msgs)

    def flush(self, unreachable, undelivered):
        """Send this turn's messages, one per peer. ``unreachable(w, call ids)`` for a worker that
        could not be reached; ``undelivered(driver socket, result ids)`` for a driver."""
        if self.to_workers:
            out, self.to_workers = self.to_workers, {}
            for w, msgs in out.items():
                if not self._send_all(w.ident, msgs):
                    unreachable(w, [call_id_of(m) for m in msgs])
        if self.to_drivers:
            out, self.to_drivers = self.to_drivers, {}
            rc = P.C[P.RESULT]
            for driver, msgs in out.items():
                if not self._send_all(driver, msgs):
                    undelivered(driver, [call_id_of(m) for m in msgs if m[0][:4] == rc])

    def clear(self):
        self.to_drivers.clear()
        self.to_workers.clear()
