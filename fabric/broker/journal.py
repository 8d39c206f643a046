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

Replay feeds the records through the broker's own state machine in order (``Broker.restore``),
then the file is compacted to the live state: calls without an outcome, and outcomes not
released. Compaction also runs when the file has grown to ``COMPACT_BYTES`` and is mostly dead.
"""
from __future__ import annotations

import logging
import os
import struct

from .. import settings

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
