"""Large payloads through the cluster's object store instead of the broker.

Across hosts (``Transfer``), a payload whose frames total ``FABRIC_STORE_THRESHOLD`` bytes or
more is encoded as usual, then ``spill`` uploads every frame of at least that size, and the
rest packed together if they still reach it, once under its content hash
(``fabric.storage.objects``); the message carries a small pickle of ``_unspill`` with the
references. The receiver fetches each object once per host into a local cache and maps it,
so buffers come back zero-copy. The same goes for results and for ``fabric.put`` objects.
It is its own module because it is the one part of serialisation that touches storage: it
imports ``fabric.storage`` only to spill or fetch, and learns of a store given in code through
one explicit hook, ``use_store``, rather than by looking for ``fabric.storage`` in ``sys.modules``.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

from .. import config
from .. import settings
from ..errors import SerializationError
from ..protocol import STORE_RESULT

STORE_THRESHOLD = 8 << 20  # default of FABRIC_STORE_THRESHOLD
TRANSFER_MODES = ("auto", "store", "broker")


def transfer_mode() -> str:
    """``FABRIC_TRANSFER``: ``auto`` (default), ``store`` or ``broker``."""
    mode = (settings.get().transfer or "auto").strip().lower()
    if mode not in TRANSFER_MODES:
        raise ValueError(f"FABRIC_TRANSFER must be one of {', '.join(TRANSFER_MODES)}, got {mode!r}")
    return mode


def store_threshold() -> int:
    """``FABRIC_STORE_THRESHOLD``: bytes (or a size like ``'8MiB'``) from which a payload
    travels through the object store; at least 1."""
    raw = settings.get().store_threshold
    if not raw:
        return STORE_THRESHOLD
    from ..resources import parse_memory

    try:
        return max(1, parse_memory(raw))
    except ValueError:
        raise ValueError(f"FABRIC_STORE_THRESHOLD must be a size like '8MiB' or a number of bytes, got {raw!r}"
                         ) from None


# --- the store hook: how a store given in code reaches this module -------------------------
_given: Callable[[], Any] | None = None


def use_store(given: Callable[[], Any] | None) -> None:
    """Install the hook that says which store this process was given in code: ``given()``
    returns it, or None while there is none (``None`` removes the hook). ``fabric.init(store=...)``
    installs ``fabric.storage.given``. ``FABRIC_STORE`` needs no hook, and without one a process
    has a store only through it: asking never imports ``fabric.storage``, which is slow to import."""
    global _given
    _given = given


def store_configured() -> bool:
    """Whether this process was given a cluster store (``FABRIC_STORE``, or the hook's store:
    ``fabric.init(store=...)``), rather than falling back to a folder of its own."""
    if settings.get().store:
        return True
    return _given is not None and _given() is not None


class Transfer:
    """Whether large payloads of one connection to a broker go through the object store.

    ``FABRIC_TRANSFER=store``: always (shared memory is then off, even on one host: how tests,
    and clusters whose hosts share a store but not a network address, force the path);
    ``broker``: never; ``auto`` (default): when a store is configured and the broker is not on
    this host (``tcp://`` to a non-loopback address), or, for results, when the call's driver
    asked for it (``STORE_RESULT``). A worker with a bad ``FABRIC_TRANSFER`` acts as ``auto``.
    """

    __slots__ = ("local", "threshold", "_mode", "_bit")

    def __init__(self, address: str, strict: bool = True):
        self.local = config.is_local_address(address)
        try:
            self._mode = transfer_mode()
            self.threshold = store_threshold()
        except ValueError:
            if strict:
                raise
            self._mode, self.threshold = "auto", STORE_THRESHOLD
        self._bit: int | None = None

    def wanted(self, asked: bool = False) -> bool:
        if self._mode != "auto":
            return self._mode == "store"
        return (asked or not self.local) and store_configured()

    def allowed(self) -> bool:
        """False under ``FABRIC_TRANSFER=broker``: nothing goes through the store."""
        return self._mode != "broker"

    def result_opts(self) -> int:
        """The call-header opts bit a driver sets: ``STORE_RESULT`` when it wants large
        results through the store. Decided at the first call."""
        bit = self._bit
        if bit is None:
            bit = self._bit = STORE_RESULT if self.wanted() else 0
        return bit


_transfers: dict = {}


def transfer_for(address: str) -> Transfer:
    """The ``Transfer`` of a worker's broker address (made once per process)."""
    t = _transfers.get(address)
    if t is None:
        t = _transfers[address] = Transfer(address, strict=False)
    return t


def _maybe_spill(payload, bufs, transfer, asked=False):
    if transfer is None:
        return payload, bufs
    limit = transfer.threshold
    total = len(payload)
    for b in bufs:
        total += b.nbytes
    if total < limit or not transfer.wanted(asked):
        return payload, bufs
    return spill(payload, bufs, limit)


class _Spilled:
    """Pickles as a call of ``_unspill``: the message that replaces a spilled payload."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return _unspill, self.args


def spill(payload, bufs: list, threshold: int, store=None, keys_out: list | None = None) -> tuple[bytes, list]:
    """Upload the large frames of ``(payload, bufs)`` to the object store; returns the small
    ``(payload, bufs)`` that travel instead: a pickle of ``_unspill(refs, payload, items)``
    whose out-of-band buffers are the frames that stayed small.

    Each frame of at least ``threshold`` bytes becomes an object of its own; if the other
    frames still total ``threshold`` or more they are packed into one more object (64-byte
    aligned). ``refs`` lists the objects (``storage.objects.upload``'s references); the
    payload is inline bytes or ``(ref index, offset, length)``, and each item is a frame
    (out-of-band) or such a triple."""
    from ..storage import objects

    if store is None:
        from .. import storage

        store = storage.default()
    parts = [memoryview(payload).cast("B"), *(memoryview(b).cast("B") for b in bufs)]
    sizes = [p.nbytes for p in parts]
    where: list = [None] * len(parts)
    refs: list = []
    try:
        for i, n in enumerate(sizes):
            if n >= threshold:
                where[i] = (len(refs), 0, n)
                refs.append(objects.upload(store, parts[i]))
        rest = [i for i in range(len(parts)) if where[i] is None]
        if rest and sum(sizes[i] for i in rest) >= threshold:
            offsets, end = [], 0
            for i in rest:
                offsets.append(end)
                end += (sizes[i] + 63) & ~63
            pack = bytearray(end)
            for i, off in zip(rest, offsets):
                pack[off:off + sizes[i]] = parts[i]
                where[i] = (len(refs), off, sizes[i])
            refs.append(objects.upload(store, pack))
    except Exception as e:  # noqa: BLE001 - e.g. the store refused our credentials
        raise SerializationError(f"a large object ({sum(sizes)} bytes) could not be sent through the object "
                                 f"store {store}: {type(e).__name__}: {e}") from e
    if keys_out is not None:
        keys_out.extend(r[0] for r in refs)
    head = where[0] if where[0] is not None else bytes(parts[0])
    items = [where[i] if where[i] is not None else pickle.PickleBuffer(parts[i]) for i in range(1, len(parts))]
    out: list = []
    blob = pickle.dumps(_Spilled(refs, head, items), protocol=5, buffer_callback=out.append)
    return blob, [b.raw() for b in out]


def _unspill(refs, head, items):
    """Run where a spilled payload is unpickled: fetch its objects (once per host, mapped
    from the host's cache) and unpickle the original payload over them."""
    from .. import storage
    from ..storage import objects

    maps = [objects.fetch(r, storage.default) for r in refs]

    def view(w):
        k, off, n = w
        return memoryview(maps[k])[off:off + n]

    payload = view(head) if isinstance(head, tuple) else head
    bufs = [view(x) if isinstance(x, tuple) else x for x in items]
    return pickle.loads(payload, buffers=bufs)
