"""The wire format: every byte fabric puts on a ZeroMQ socket is framed here, and only here.

Spec, frame by frame: ``docs/protocol.md``. Summary: every message is a multipart ZeroMQ
message whose first frame starts with ``b"FB" + VERSION + command`` (4 bytes), followed by a
fixed-size header for SUBMIT, CALL, PUT, RESULT and DONE. The
broker binds one ROUTER socket; every peer connects a DEALER whose routing id names its role:

    d<driver-id:8>   a driver's submit socket      r<driver-id:8>   the same driver's result socket
    e<executor-id:8> an executor daemon            w<executor-id:8><n:4>  a worker process
    l<executor-id:8><n:4> that worker's log socket c<random:8>      a control client (CLI)

Call and result headers are fixed-size ``struct`` records appended to the command frame (one
frame fewer per message: in Python each frame costs microseconds on every hop), so the broker
routes without unpickling anything: argument, code and result frames pass through untouched.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator, NamedTuple, Sequence

import zmq

from .errors import ProtocolError

VERSION = 3  # 3: the call header's flags byte split in concurrency and window (92 bytes)
# 2: the call header gained max_containers and min_warm; code frames start with a name
SIG = b"FB" + bytes([VERSION])

# --- commands -------------------------------------------------------------------------------
# "cmd+call-hdr" is one frame: the command frame followed by the header's bytes.
# driver -> broker
HELLO = 1         # [cmd, json]                      register a driver socket (both d and r send it)
SUBMIT = 2        # [cmd+call-hdr, (code), (deps), payload, *buffers, (gang)]   (code)/(deps)/(gang): see opts
CANCEL = 3        # [cmd, ids, (flags)]              ids: concatenated 16-byte call ids; flags: one
                  # byte, 1 force, 2 recursive (absent: force, not recursive)
CONSUMED = 11     # [cmd+call-id+count]              a stream's consumer took `count` items (count: 8 bytes,
                  # big-endian); the broker forwards the frame as is to the worker's log socket
RELEASE = 4       # [cmd, ids]                       the driver holds these results now / dropped them
PUT = 5           # [cmd+result-hdr, payload, *buffers]   store an object under a driver-made id
KILL_ACTOR = 6    # [cmd, actor-id, b"1"=now | b"0"=when idle]
BYE = 7           # [cmd]                            the driver is going away
STATUS = 8        # [cmd]                            -> STATUS_REPLY
NAME = 12         # [cmd, json]                      (control clients) register or look up a named instance
FETCH = 13        # [cmd, ids]                       send me these results (any driver's): a Future
                  # that travelled inside a value is read where it arrived (docs/protocol.md FETCH)
SHUTDOWN = 9      # [cmd]                            stop the cluster (control clients and drivers)
ARENA = 14        # [cmd, json]                      {"path", "bytes"}: the driver's shared-memory arena is
                  # made; the broker has idle workers on its host map it ahead (MAP_ARENA)
# any direction
BATCH = 10        # [cmd, *message, *message, ...]   several SUBMIT, RESULT or CALL messages in one:
                  # each inner message keeps its own first frame; its length follows from its header
# broker -> driver
WELCOME = 20      # [cmd, json]
RESULT = 21       # [cmd+result-hdr, payload, *buffers]
LOG = 22          # [cmd, source, text]              worker output for this driver
ERROR = 23        # [cmd, text]                      a message of this peer was refused
STATUS_REPLY = 24 # [cmd, json]
NAME_REPLY = 25   # [cmd, json]                      the answer to NAME
# executor -> broker
EXEC_HELLO = 40   # [cmd, json]                      resources: cpus, gpus, memory, host, labels
HEARTBEAT = 41    # [cmd, json]
WORKER_DIED = 42  # [cmd, worker-id, json]
EXEC_BYE = 43     # [cmd]
# broker -> executor
SPAWN = 50        # [cmd, json]                      start a worker: {"token", "gpus": [..], "actor": hex|None}
KILL_WORKER = 51  # [cmd, worker-id]
EXEC_SHUTDOWN = 52  # [cmd]
# worker -> broker
READY = 60        # [cmd, json]                      {"kind": "pool"|"spawned", "pid", "credit", "token"?, "addr"?}
DONE = 61         # [cmd+result-hdr, payload, *buffers]
ITEM = 64         # [cmd+result-hdr+index, payload, *buffers]   one item of a streaming call, in order
                  # (index: 8 bytes, big-endian, from 0); the broker forwards it as is to the driver
WLOG = 62         # [cmd, driver-id, source, text]   (sent from the worker's log socket)
DROPPED = 63      # [cmd, call-id, b"d"|b"r"|b"f"]   (from the log socket) the answer to DROP: d dropped
                  # (it will never run), r running now, f finished (its DONE is sent or on its way)
BLOCKED = 65      # [cmd, call-id]                   the call it runs waits for calls it submitted (fabric.get,
                  # .result(), fabric.wait): the broker lends its CPUs out and prefetches nothing onto it
UNBLOCKED = 66    # [cmd, call-id]                   that call runs again: it takes its CPUs back
# broker -> worker
CALL = 70         # [cmd+call-hdr, (code), (deps), payload, *buffers, (gang), *dep-blobs]
                  # dep-blob: [result-hdr, payload, *buffers], one per id in deps, in that order
                  # gang: the member's context (json): rank, world_size, local_rank, addresses, ...
WARM = 71         # [cmd, code-hash, code]           load this code now (a function's min_warm)
INTERRUPT = 72    # [cmd, call-id]                   (to the worker's log socket) raise fabric.Cancelled
                  # in the call it runs, if it is that one: fabric.cancel(fut, force=False)
DROP = 73         # [cmd, call-id, (b"k")]           (to the worker's log socket) a cancelled call sent to this
                  # worker: do not start it if it has not started; answer DROPPED. With "k": if it runs
                  # it now, end this process (EXIT_STOPPED) instead of answering r
MAP_ARENA = 74    # [cmd, json]                      {"path", "bytes"}: map this driver's arena now, while idle
                  # (an optimisation only: a worker may ignore it)

NAMES = {v: k for k, v in dict(globals()).items() if isinstance(v, int) and k.isupper() and k != "VERSION"}


def cmd(c: int) -> bytes:
    return SIG + bytes([c])


C = {c: cmd(c) for c in NAMES}  # pre-built command frames

# --- call header ----------------------------------------------------------------------------
# The header's fields, in wire order (docs/protocol.md §4.2). ``CallHeader`` names them; the
# struct packs them. opts stays the last byte: the broker sets and clears HAS_CODE in place.
CALL_HDR = struct.Struct("<16s16sB16sddQhdHHHBBB")
HAS_CODE, HAS_DEPS = 1, 2  # opts bits: a code frame follows / a deps frame follows
STORE_RESULT = 4  # opts bit: the driver wants a large result through the object store (serde.Transfer)
STREAM = 16       # opts bit: the call is a generator; its items come as ITEMs, at most `window` unconsumed
HAS_GANG = 8      # opts bit: a gang frame follows the buffers (SUBMIT: the members' call ids; CALL: json)
TASK, ACTOR_NEW, ACTOR_CALL, GANG = 0, 1, 2, 3  # GANG: n members that start together (with HAS_GANG)
MAX_GANG = 1024   # members of one gang: each member's CALL lists every member's address
NO_ID = bytes(16)
STREAM_WINDOW = 64  # a STREAM call's window when its header says 0

_new = tuple.__new__  # builds a NamedTuple from a tuple without its Python-level __new__ (~1 us)


class CallHeader(NamedTuple):
    """One call header, by name. ``read`` and ``pack`` cost what a bare ``struct`` does:
    build one with ``CallHeader.of(...)`` (positional, all fields) on hot paths, or by keyword."""

    call_id: bytes          # driver id (8) + counter (8): unique per driver, so replays are recognisable
    code_hash: bytes        # blake2b-128 of the cloudpickled function/class; NO_ID for method calls
    kind: int               # TASK | ACTOR_NEW | ACTOR_CALL | GANG
    actor_id: bytes         # NO_ID for plain tasks and gangs
    cpus: float
    gpus: float
    memory: int             # bytes
    retries: int
    timeout: float          # seconds, 0 = none
    nbuf: int               # out-of-band buffer frames after the payload
    max_containers: int = 0  # 0 = no cap
    min_warm: int = 0        # containers kept warm for this function/class (GANG: workers per executor)
    concurrency: int = 0     # ACTOR_NEW: the instance's concurrency (0 or 1: one call at a time)
    window: int = 0          # STREAM: the most items made ahead of the consumer (0: STREAM_WINDOW)
    opts: int = 0            # which optional frames follow, and the STORE_RESULT/STREAM bits

    @classmethod
    def of(cls, *fields: Any) -> "CallHeader":
        """All fields, positionally: a NamedTuple's own constructor costs ~1 us more."""
        return _new(cls, fields)

    @classmethod
    def read(cls, b: bytes) -> "CallHeader":
        """The header in ``b`` (exactly its bytes), or ProtocolError."""
        try:
            return _new(cls, _call_unpack(b))
        except struct.error:
            raise ProtocolError(f"call header must be {CALL_HDR.size} bytes, got {len(b)}") from None

    def pack(self, add_opts: int = 0) -> bytes:
        """The header's bytes; ``add_opts``: bits set on top of ``opts`` (the driver's HAS_CODE)."""
        if add_opts:
            return _call_pack(*self[:-1], self.opts | add_opts)
        return _call_pack(*self)


_call_unpack, _call_pack = CALL_HDR.unpack, CALL_HDR.pack


def pack_call(call_id: bytes, code_hash: bytes, kind: int, actor_id: bytes, cpus: float, gpus: float, memory: int,
              retries: int, timeout: float, nbuf: int, *, max_containers: int = 0, min_warm: int = 0,
              concurrency: int = 0, window: int = 0, opts: int = 0) -> bytes:
    """A call header's bytes (tests and tools; the driver packs its CallHeader itself)."""
    return _call_pack(call_id, code_hash, kind, actor_id, cpus, gpus, memory, retries, timeout, nbuf,
                      max_containers, min_warm, concurrency, window, opts)


def unpack_call(b: bytes) -> CallHeader:
    return CallHeader.read(b)


def code_name(frame: Any) -> str:  # any buffer: bytes, a zmq.Frame
    """The name at the head of a code frame: code frames are ``qualified name, NUL, cloudpickle``
    (``serde.code_blob``), so the broker can name functions without unpickling anything."""
    head = bytes(memoryview(frame)[:201])
    return head.split(b"\0", 1)[0].decode("utf-8", "replace") if b"\0" in head else "?"


# --- result header --------------------------------------------------------------------------
RESULT_HDR = struct.Struct("<16sBHdB")
SHM_FREE = 1      # result flag: the worker holds no mapping of the call's shared-memory arguments
OK = 0            # payload: pickled value
USER_ERROR = 1    # payload: pickled (exception | None, type name, message, traceback text)
CRASHED = 2       # payload: utf-8 message (this and below are made by the broker)
TIMEOUT = 3
CANCELLED = 4
UNSCHEDULABLE = 5
SERIALIZATION = 6  # payload: utf-8 message (made by a worker that could not pickle a result)
ACTOR_DIED = 7
REFUSED = 8       # the call was refused: malformed, an unknown dependency, or its driver is not connected
GANG_FAILED = 9   # payload: utf-8 message: a member of this call's gang failed, so the gang was stopped
OUT_OF_MEMORY = 10  # payload: utf-8 message: the call's worker broke its memory= limit (or the host ran low)

EXIT_MEMORY = 86  # a worker's exit code when it ends itself for breaking its call's memory= limit
EXIT_STOPPED = 87  # a worker's exit code when it ends itself for a DROP "k" of the call it runs

ID_LEN = 16


class ResultHeader(NamedTuple):
    """One result header (PUT, RESULT, DONE, ITEM, dep-blobs), by name."""

    call_id: bytes
    status: int
    nbuf: int = 0
    duration: float = 0.0   # seconds the call ran on the worker; 0 in outcomes the broker makes
    flags: int = 0          # SHM_FREE

    @classmethod
    def read(cls, b: bytes, offset: int = 0) -> "ResultHeader":
        """The header at ``offset`` of ``b`` (a command frame: offset 4); ``b`` may hold more
        after it (an ITEM's index)."""
        try:
            return _new(cls, _result_unpack_from(b, offset))
        except struct.error:
            raise ProtocolError(f"result header must be {RESULT_HDR.size} bytes, got {len(b) - offset}") from None

    def pack(self) -> bytes:
        return _result_pack(*self)


_result_unpack_from, _result_pack = RESULT_HDR.unpack_from, RESULT_HDR.pack


def pack_result(call_id: bytes, status: int, nbuf: int = 0, duration: float = 0.0, flags: int = 0) -> bytes:
    return _result_pack(call_id, status, nbuf, duration, flags)


def unpack_result(b: bytes) -> ResultHeader:
    if len(b) != RESULT_HDR.size:
        raise ProtocolError(f"result header must be {RESULT_HDR.size} bytes, got {len(b)}")
    return _new(ResultHeader, _result_unpack_from(b))


def item_index(head: bytes) -> int:
    """The index of an ITEM, from its header (a result header and 8 bytes, big-endian)."""
    return int.from_bytes(head[RESULT_HDR.size:ITEM_SIZE], "big")


ITEM_SIZE = RESULT_HDR.size + 8  # an ITEM's header: a result header and the item's index
HEADER_SIZE = {SUBMIT: CALL_HDR.size, CALL: CALL_HDR.size, PUT: RESULT_HDR.size, RESULT: RESULT_HDR.size,
               DONE: RESULT_HDR.size, ITEM: ITEM_SIZE, CONSUMED: ID_LEN + 8}


def command_of(frame0: bytes) -> int:
    """The command of a message, or ProtocolError when the first frame is not ours."""
    if len(frame0) < 4 or frame0[:3] != SIG:
        if len(frame0) >= 3 and frame0[:2] == b"FB":
            raise ProtocolError(f"protocol version {frame0[2]} is not supported (this side speaks {VERSION})")
        raise ProtocolError("not a fabric message (first frame must be b'FB' + version + command)")
    c = frame0[3]
    if c not in NAMES:
        raise ProtocolError(f"unknown command {c}")
    if len(frame0) != 4 + HEADER_SIZE.get(c, 0):
        raise ProtocolError(f"{NAMES[c]}: first frame must be {4 + HEADER_SIZE.get(c, 0)} bytes, got {len(frame0)}")
    return c


_BATCHABLE = {SUBMIT, RESULT, CALL, ITEM}


def unbatch(frames: list[zmq.Frame], start: int = 1) -> Iterator[tuple[int, bytes, Any, list[zmq.Frame]]]:
    """Yield ``(command, header bytes, header, frames)`` for each message inside a BATCH: the
    header read once (a ResultHeader or a CallHeader), for the receiver to use as it is.

    Inner CALLs carry no dependency blobs (the broker never batches those)."""
    i, n = start, len(frames)
    while i < n:
        f0 = frames[i].bytes
        c = command_of(f0)
        if c not in _BATCHABLE:
            raise ProtocolError(f"{NAMES[c]} cannot travel inside a BATCH")
        head = f0[4:]
        if c == RESULT or c == ITEM:
            h: Any = ResultHeader.read(head)
            size = 2 + h.nbuf
        else:
            h = CallHeader.read(head)
            o = h.opts
            size = 2 + (o & HAS_CODE) + ((o & HAS_DEPS) >> 1) + ((o & HAS_GANG) >> 3) + h.nbuf
        if i + size > n:
            raise ProtocolError("BATCH ends inside a message")
        yield c, head, h, frames[i + 1:i + size]
        i += size


def split_ids(b: bytes) -> list[bytes]:
    if len(b) % ID_LEN:
        raise ProtocolError(f"id list length {len(b)} is not a multiple of {ID_LEN}")
    return [b[i:i + ID_LEN] for i in range(0, len(b), ID_LEN)]


def dumps_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads_json(b: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(b))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed json frame: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("json frame must hold an object")
    return obj


# --- identities -----------------------------------------------------------------------------
def new_id(n: int = 8) -> bytes:
    return os.urandom(n)


def driver_ids(driver_id: bytes) -> tuple[bytes, bytes]:
    """(submit socket id, result socket id) of a driver."""
    return b"d" + driver_id, b"r" + driver_id


def worker_id(executor_id: bytes, n: int) -> bytes:
    return b"w" + executor_id + n.to_bytes(4, "big")


def log_id(executor_id: bytes, n: int) -> bytes:
    return b"l" + executor_id + n.to_bytes(4, "big")


# --- sending --------------------------------------------------------------------------------
_SNDMORE = 2  # zmq.SNDMORE as a plain int: pyzmq's enum arithmetic costs microseconds per frame
_COPY_BELOW = 65536


def send(sock: zmq.Socket[Any], parts: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message; small parts are copied (cheapest), large ones zero-copy.

    pyzmq's ``send_multipart`` costs ~11 us for a 5-part call message, this ~4 us."""
    s = sock.send
    last = len(parts) - 1
    for i, p in enumerate(parts):
        f = flags if i == last else flags | _SNDMORE
        if type(p) is bytes and len(p) < _COPY_BELOW:
            s(p, f)
        else:
            s(p, f, copy=False)


def recv(sock: zmq.Socket[Any], flags: int = 0) -> list[zmq.Frame]:
    """Receive one multipart message as zero-copy Frames (~3 us; ``recv_multipart`` ~8 us)."""
    r = sock.recv
    parts = [r(flags, False)]
    while parts[-1].more:
        parts.append(r(flags, False))
    return parts


def recv_batch(sock: zmq.Socket[Any], most: int) -> list[list[zmq.Frame]]:
    """The messages ready on a polled socket, up to ``most``, without waiting. One message
    alone (a sync call) is the common case: asking for EVENTS (~1.5 us) is cheaper than the
    failing recv that would otherwise end the batch (~5 us, a zmq.Again raised)."""
    try:
        batch = [recv(sock, 1)]  # 1: NOBLOCK
    except zmq.Again:  # (polled, so there is one; unless its peer vanished meanwhile)
        return []
    if sock.getsockopt(zmq.EVENTS) & 1:  # type: ignore[operator]  # an int for EVENTS; 1: POLLIN, more are ready
        for _ in range(most - 1):
            try:
                batch.append(recv(sock, 1))
            except zmq.Again:
                break
    return batch
