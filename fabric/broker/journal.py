"""The broker's journal: what it accepted, so a broker killed outright loses none of it.

Why a journal and not only the drivers' memory: drivers re-send the calls they still wait for
when they notice a new broker (see ``Client._rejoin``), which alone loses nothing while the
driver lives. The journal adds the rest: outcomes that were made but not yet delivered are not
computed again, and calls that other calls depend on keep their results across the restart.

Format: an append-only file of records. Each record is::

    u32 total length of what follows | u8 kind | u16 frame count | (u32 length, bytes) per frame

``kind`` is one of CODE (hash, code blob), CALL (call frames as the broker keeps them:
header, deps, payload, *buffers), OUTCOME (call id, status, result frames), FORGET (ids whose
outcomes the driver released). Records are buffered and written with one ``write`` per broker
loop turn: a process killed with SIGKILL loses nothing the kernel has accepted (a crash of the
whole machine may lose the last turn; ``fsync=True`` closes that too, at a cost per turn). A
torn record at the end of the file (killed mid-write) is ignored on replay.

Replay (``restore``, below) feeds the records through the broker's own parts in order (admission,
outcomes), then the file is compacted to the live state (``live_records``): calls without an outcome, and outcomes not
released. Compaction also runs when the file has grown to ``COMPACT_BYTES`` and is mostly dead.
"""
from __future__ import annotations

import logging
import os
import struct

from .. import protocol as P
from .. import settings
from .state import Call

log = logging.getLogger("fabric.broker")

CODE, CALL, OUTCOME, FORGET = 1, 2, 3, 4
_REC = struct.Struct("<IBH")
_LEN = struct.Struct("<I")
COMPACT_BYTES = settings.get().journal_compact_bytes
MAX_RECORD = settings.get().journal_max_record  # bigger calls: drivers re-send


def encode(kind: int, frames) -> bytes:
    parts = []
    for f in frames:
        b = f if isinstance(f, (bytes, bytearray)) else (f.buffer if hasattr(f, "buffer") else memoryview(f))
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    body = b"".join(parts)
    return _REC.pack(len(body) + 3, kind, len(frames)) + body


def read(path: str):
    """Yield ``(kind, frames)`` for each whole record in the file, oldest first (streamed: a long
    journal is not read into memory at once)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        pos = 0
        while True:
            head = f.read(_REC.size)
            if not head:
                return
            if len(head) < _REC.size:
                log.warning("journal %s: ignored a torn record at its end (%d bytes)", path, len(head))
                return
            total, kind, n = _REC.unpack(head)
            if total < 3:
                log.warning("journal %s: ignored a malformed record at offset %d and what follows", path, pos)
                return
            body = f.read(total - 3)
            if len(body) < total - 3:
                log.warning("journal %s: ignored a torn record at its end (%d bytes)", path, len(head) + len(body))
                return
            frames, p, view = [], 0, memoryview(body)
            try:
                for _ in range(n):
                    (ln,) = _LEN.unpack_from(view, p)
                    frames.append(bytes(view[p + 4:p + 4 + ln]))
                    p += 4 + ln
            except struct.error:
                p = -1
            if p != len(body):
                log.warning("journal %s: ignored a malformed record at offset %d and what follows", path, pos)
                return
            yield kind, frames
            pos += _REC.size + len(body)


class Journal:
    def __init__(self, path: str, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.buf: list[bytes] = []
        self.f = open(path, "ab")
        self.size = self.f.tell()
        self.skipped = 0

    def add(self, kind: int, frames) -> bool:
        rec = encode(kind, frames)
        if len(rec) > MAX_RECORD:
            self.skipped += 1
            return False
        self.buf.append(rec)
        return True

    def code(self, code_hash: bytes, blob) -> None:
        self.add(CODE, [code_hash, blob])

    def call(self, frames) -> bool:
        return self.add(CALL, frames)

    def outcome(self, cid: bytes, status: int, frames) -> None:
        self.add(OUTCOME, [cid, bytes([status]), *frames])

    def forget(self, ids) -> None:
        if ids:
            self.buf.append(encode(FORGET, [b"".join(ids)]))

    def flush(self) -> None:
        if not self.buf:
            return
        data, self.buf = b"".join(self.buf), []
        self.f.write(data)
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())
        self.size += len(data)

    def rewrite(self, records) -> None:
        """Replace the file with ``records`` (the live state) atomically."""
        self.flush()
        tmp = self.path + ".tmp"
        n = 0
        with open(tmp, "wb") as out:
            for kind, frames in records:
                rec = encode(kind, frames)
                if len(rec) <= MAX_RECORD:
                    out.write(rec)
                    n += len(rec)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self.f.close()
        self.f = open(self.path, "ab")
        self.size = n

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.f.close()


# ---------------------------------------------------------------------------- replay
def restore(path, st, out, drivers, admission, outcomes, instances) -> int:
    """Replay the journal at ``path`` through the broker's own parts; returns the records read.

    Calls without an outcome are queued again (one that was running when the old broker
    died runs again: execution is at-least-once, delivery of its outcome at-most-once per
    driver). Outcomes not yet released are kept and re-sent when their driver rejoins and
    asks. Instances cannot be replayed (their state lived in a worker): they end with
    ACTOR_DIED saying so. The caller then opens the journal and compacts it.
    """
    n, st.restoring = 0, True
    try:
        for kind, fr in read(path):
            n += 1
            try:
                replay(kind, fr, st, drivers, admission, outcomes)
            except Exception as e:  # noqa: BLE001 - one bad record must not lose the rest
                log.warning("journal %s: skipped record %d (kind %d): %s: %s", path, n, kind,
                            type(e).__name__, e)
        msg = (b"the broker restarted and an instance's state lives only in its worker: this instance "
               b"is gone; create a new one")
        for a in list(st.actors.values()):
            instances.kill_actor(a, msg)
        st.pending_actors.clear()
    finally:
        st.restoring = False
        out.clear()
    st.unsent = set(st.results)  # none of these reached its driver from this broker
    return n


def replay(kind, fr, st, drivers, admission, outcomes):
    """Apply one journal record."""
    if kind == CODE:
        st.code[fr[0]] = fr[1]
    elif kind == CALL:
        h = P.CallHeader.read(fr[0])
        cid = h.call_id
        if cid in st.calls or cid in st.results:
            return
        if h.kind != P.ACTOR_CALL and h.code_hash not in st.code:
            return  # its code was lost: its driver re-sends the call, with code, when it rejoins
        drivers.restored(cid[:8])
        admission.admit(Call(cid, b"r" + cid[:8], fr, h), P.split_ids(fr[1]) if fr[1] else None)
    elif kind == OUTCOME:
        cid, status, frames = fr[0], fr[1][0], fr[2:]
        call = st.calls.get(cid)
        if call is not None:
            outcomes.finish(call, status, None, frames)
        else:
            st.results[cid] = [status, *frames]
    elif kind == FORGET:
        for cid in P.split_ids(fr[0]):
            st.results.pop(cid, None)
            call = st.calls.get(cid)
            if call is not None:
                outcomes.finish(call, P.CANCELLED, b"", deliver=False)


def live_records(st):
    """The live state as journal records: what a compacted journal holds."""
    for h, code in st.code.items():  # all of it: drivers send each function's code once
        yield CODE, [h, code]
    extra = []
    for cid, r in st.results.items():
        yield OUTCOME, [cid, bytes([r[0]]), *r[1:]]
    for c in st.calls.values():
        for dep, r in (c.depv or {}).items():  # resolved deps whose results were released
            if dep not in st.results:
                extra.append(dep)
                yield OUTCOME, [dep, bytes([r[0]]), *r[1:]]
    for c in st.calls.values():
        if c.kind not in (P.ACTOR_CALL, P.GANG):  # gangs are not journaled: drivers re-send them
            yield CALL, c.frames
    if extra:
        yield FORGET, [b"".join(extra)]
