"""The store copies of a driver's large ``fabric.put`` objects, and their deletion.

A put object of ``FABRIC_PUT_SPILL`` bytes or more (or, across hosts, of the transfer
threshold) goes to the object store instead of the broker's memory (``serde.spill``). Two put()s
of the same content share its store keys, so a key is deleted when the last put() Future
holding it is dropped, and every key this driver still holds when it closes.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("fabric.client")


class Spilled:
    """Which put() ids hold which store keys, with a count per key (not thread-safe: the
    driver's IO thread and its submitting threads serialise on the connection's own locks)."""

    def __init__(self):
        self.by_id: dict[bytes, list] = {}   # put() id -> store keys of its spilled object
        self.refs: dict[str, int] = {}       # store key -> live put()s holding it

    def __bool__(self):
        return bool(self.by_id)

    def add(self, cid: bytes, keys: list) -> None:
        """put() ``cid`` holds ``keys`` (a re-sent put is counted once)."""
        if keys and cid not in self.by_id:
            self.by_id[cid] = keys
            for k in keys:
                self.refs[k] = self.refs.get(k, 0) + 1

    def forget(self, ids) -> None:
        """put() objects dropped: delete, on a thread of its own, the keys nobody else here holds."""
        gone = []
        for cid in ids:
            for k in self.by_id.pop(cid, ()):
                n = self.refs.get(k, 0) - 1
                if n > 0:
                    self.refs[k] = n
                else:
                    self.refs.pop(k, None)
                    gone.append(k)
        if gone:
            threading.Thread(target=delete_objects, args=(gone,), name="fabric-spill-gc", daemon=True).start()

    def close(self) -> None:
        """The driver ends: its put() objects end with it (deleted now, on this thread)."""
        if self.refs:
            delete_objects(list(self.refs))
        self.by_id.clear()
        self.refs.clear()


def delete_objects(keys) -> None:
    from . import storage

    try:
        store = storage.default()
        for k in keys:
            try:
                store.delete(k)
            except Exception:  # noqa: BLE001 - gone already, or the store is away: it stays, harmless
                log.debug("could not delete spilled object %s", k)
    except Exception:  # noqa: BLE001
        log.debug("no store to delete spilled objects from")
