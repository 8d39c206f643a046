"""A worker process: the "container" that runs calls.

Started by its executor daemon (``python -m fabric.executor.worker``), it connects straight to
the broker with a DEALER socket and runs the calls the broker sends it, in arrival order, on
its main thread. It caches function code by content hash, so code crosses the wire once per
worker. A *pool* worker runs any function; a *spawned* worker hosts one ``@fabric.cls``
instance (kept warm between calls, ``concurrency=N`` calls at once on a thread pool) or runs
calls pinned to a set of GPUs (``CUDA_VISIBLE_DEVICES`` fixed when the process starts, before
any CUDA library can read it).

What user code prints goes to the executor's log file and, prefixed, to the driver that made
the call: flushed on the worker's socket before the call's result (so it reaches the driver
first) and every 100 ms from a second socket during long calls; at most ``LOG_RATE`` bytes/s.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import inspect
import mmap
import os
import signal
import socket
import sys
import threading
import time

import zmq

from .. import config
from .. import protocol as P
from .. import security
from .. import gangs as _gang
from .. import settings
from ..errors import SerializationError
from ..serde import pickling, shm
from ..serde.code import load_code
from ..serde.transfer import transfer_for

LOG_RATE = settings.get().log_rate  # bytes per second per worker


def _die_with_parent():
    """Ask Linux to SIGKILL us when our executor dies, so no worker outlives its cluster."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


MEMORY_POLL = settings.get().memory_poll  # seconds between memory checks
# ids of the last calls begun, kept to answer DROP ("finished"): more than any worker's credit,
# so a call whose DONE the broker has not read yet is always among them
BEGUN_KEEP = max(4096, 2 * settings.get().actor_pipeline)
# results that are never awaitable, checked before inspect.isawaitable (an ABC check, ~0.3 us)
_PLAIN = (type(None), int, float, str, bytes, bool, list, tuple, dict)


class OutputChannel:
    """Collects what user code prints and ships it to the drivers, rate-limited."""

    def __init__(self, ctx, address, ident):
        self.lock = threading.Lock()
        self.parts: dict[tuple, list] = {}   # (driver id, source) -> [text]
        self.ctx, self.address, self.ident = ctx, address, ident
        self.allowance, self.stamp, self.dropped = LOG_RATE, time.monotonic(), 0
        self.local = threading.local()
        self.on_interrupt = None
        self.on_consumed = None
        self.on_drop = None
        threading.Thread(target=self._flusher, name="fabric-output", daemon=True).start()

    def write(self, text):
        ctx = getattr(self.local, "ctx", None)
        if ctx is None or not text:
            return
        with self.lock:
            now = time.monotonic()
            self.allowance = min(LOG_RATE, self.allowance + (now - self.stamp) * LOG_RATE)
            self.stamp = now
            if len(text) > self.allowance:
                self.dropped += len(text)
                return
            self.allowance -= len(text)
            self.parts.setdefault(ctx, []).append(text)

    def take(self, whole_lines=False):
        """What to ship now. ``whole_lines``: keep a trailing partial line for later, so a
        ``print`` split across flushes (its text, then its newline) reaches the driver whole."""
        with self.lock:
            parts, self.parts = self.parts, {}
            dropped, self.dropped = self.dropped, 0
            if whole_lines:
                for key in list(parts):
                    text = "".join(parts[key])
                    cut = text.rfind("\n") + 1
                    if cut < len(text):
                        self.parts[key] = [text[cut:]]
                    if cut:
                        parts[key] = [text[:cut]]
                    else:
                        del parts[key]
        out = []
        for (did, source), texts in parts.items():
            text = "".join(texts)
            if dropped:
                text += f"[fabric: {dropped} bytes of output dropped: over {LOG_RATE} bytes/s]\n"
                dropped = 0
            out.append([P.C[P.WLOG], did, source, text.encode("utf-8", "replace")])
        return out

    def flush_on(self, sock, whole_lines=False):
        if not self.parts and not self.dropped:  # (once per call: nothing printed is the rule; a
            return                               # line another thread adds now goes within 0.1 s)
        for msg in self.take(whole_lines):
            sock.send_multipart(msg)

    def _flusher(self):
        sock = self.ctx.socket(zmq.DEALER)
        security.curve_client(sock, "executor", address=self.address)  # CurveZMQ: tcp://, or FABRIC_KEYS
        sock.setsockopt(zmq.ROUTING_ID, self.ident)
        sock.setsockopt(zmq.LINGER, 500)
        sock.connect(self.address)
        while True:
            # the broker sends INTERRUPT here (fabric.cancel(fut, force=False)): the main thread
            # is busy in the user's call and does not read its own socket until it returns
            if sock.poll(100):
                frames = sock.recv_multipart()
                f0 = frames[0]
                if f0[:4] == P.C[P.CONSUMED] and len(f0) == 28 and self.on_consumed is not None:
                    self.on_consumed(f0[4:20], int.from_bytes(f0[20:28], "big"))  # a stream's driver took items
                elif frames[0] == P.C[P.INTERRUPT] and len(frames) == 2 and self.on_interrupt is not None:
                    self.on_interrupt(frames[1])
                elif frames[0] == P.C[P.DROP] and len(frames) in (2, 3) and self.on_drop is not None:
                    sock.send_multipart([P.C[P.DROPPED], frames[1], self.on_drop(frames[1], frames[2:] == [b"k"])])
            self.flush_on(sock, whole_lines=True)  # mid-call: the call's end flushes the rest


class _Tee:
    """sys.stdout/sys.stderr replacement: the log file gets everything, the driver its share.
    In the log, a call's lines start with its source, as the driver shows them (``(score
    pid=12) ...``): ``fabric logs APP`` finds an app's output by it."""

    def __init__(self, stream, channel):
        self.stream, self.channel = stream, channel
        self.bol = True  # the log is at the start of a line

    def write(self, s):
        self.channel.write(s)
        ctx = getattr(self.channel.local, "ctx", None)
        if ctx is None or not s:
            if s:
                self.bol = s.endswith("\n")
            return self.stream.write(s)
        prefix = f"({ctx[1].decode('utf-8', 'replace')}) "
        out = []
        for piece in s.splitlines(keepends=True):
            if self.bol:
                out.append(prefix)
            out.append(piece)
            self.bol = piece.endswith(("\n", "\r"))
        self.stream.write("".join(out))
        return len(s)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


_NO_CALL = bytes(P.ID_LEN)


def _run_file(path):
    """The executor's file for the id of the call this worker runs (mapped: a write costs
    ~0.2 us). Read by the executor after this process dies, so the broker knows which call the
    death cut off; None without it (the broker then blames the oldest call it sent here)."""
    if not path:
        return None
    try:
        with open(path, "r+b") as f:
            return mmap.mmap(f.fileno(), P.ID_LEN)
    except (OSError, ValueError):
        return None


class Worker:
    def __init__(self, address, executor_id: bytes, n: int, kind="pool", token=None, credit=1):
        self.address = address
        self.ident = P.worker_id(executor_id, n)
        self.ctx = zmq.Context()
        s = self.sock = self.ctx.socket(zmq.DEALER)
        security.curve_client(s, "executor", address=address)  # CurveZMQ: tcp://, or FABRIC_KEYS
        s.setsockopt(zmq.ROUTING_ID, self.ident)
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(address)
        self.kind, self.token, self.credit = kind, token, credit
        self.code: dict[bytes, object] = {}
        self.instance = None
        self.mem_limit = 0          # bytes: the memory= of what runs now (0: none)
        self.mem_thread = None
        self.label = f"pid={os.getpid()}"
        self.pool = None            # thread pool of a concurrent instance
        self.results_in = None      # where that pool's threads hand their results to the main loop
        self.polled = set()
        self.loop = None            # event loop for async functions and methods
        self.output = OutputChannel(self.ctx, address, P.log_id(executor_id, n))
        self.current = None         # the id of the plain call running on the main thread
        self.interrupted = None
        self.output.on_interrupt = self.interrupt
        self.streams: dict[bytes, _Stream] = {}  # generator calls running here, by call id
        self.output.on_consumed = self.consumed
        # DROP (a cancelled call sent here, maybe not started): the output thread decides under
        # `gate`, against the thread that starts calls, whether it runs ("r"), ran ("f") or never will
        self.gate = threading.Lock()
        self.active: set[bytes] = set()    # ids of the calls running now, on any thread
        # id -> how many of its CALLs this worker must skip: one per DROP answered d. A call taken
        # back (DROP) may be sent here again before the first copy was read; each copy that comes
        # was answered for once, so the count, not a set, keeps either from running (issue 18)
        self.dropped: dict[bytes, int] = {}
        self.begun = bytearray(P.ID_LEN * BEGUN_KEEP)  # ring of the ids of the last calls started
        self.begun_at = 0
        self.output.on_drop = self.drop
        self.blocked, self.blocked_cid = 0, None  # waits in progress of the plain call running here
        self.lendable = None         # that call's id: the main thread's waits in it lend its CPUs
        self.threads_lend = False    # while its function runs, waits on its other threads lend them too
        self.block_lock = threading.Lock()  # BLOCKED/UNBLOCKED may come from the user's threads
        from .. import futures as _futures
        _futures.blocking = self  # a nested driver's waits call block()/unblock()
        os.environ["FABRIC_WORKER_ID"] = self.ident.hex()  # a nested driver names its worker in HELLO
        s = settings.reload()
        sys.stdout = _Tee(sys.stdout, self.output)
        sys.stderr = _Tee(sys.stderr, self.output)
        self.ppid = int(s.executor_pid or 0) or os.getppid()
        self.mark = _run_file(s.run_file)

    def serve(self):
        ready = {"kind": self.kind, "pid": os.getpid(), "credit": self.credit}
        if self.token is not None:
            ready["token"] = self.token
        if self.kind == "spawned":  # where this worker could listen, should it run a gang member
            ready["addr"] = listen_address(self.address)
        self.sock.send_multipart([P.C[P.READY], P.dumps_json(ready)])
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while True:
            if self.results_in is not None and self.results_in not in self.polled:
                poller.register(self.results_in, zmq.POLLIN)  # a concurrent instance started
                self.polled.add(self.results_in)
            events = dict(poller.poll(shm.SETTLE_IDLE_MS if shm.unsettled() else 1000))
            shm.forget_removed()  # (at most once a second) unmap files the driver has removed
            if not events:
                shm.settle()  # idle since the last DONE went: keep or unmap its mappings now
                if os.getppid() != self.ppid:
                    return  # our executor is gone
                continue
            if sock in events:
                frames = P.recv(sock)
                if frames[0].bytes == P.C[P.ERROR]:  # e.g. our READY overtook our executor's HELLO
                    time.sleep(0.1)
                    self.sock.send_multipart([P.C[P.READY], P.dumps_json(ready)])
                else:
                    f0 = frames[0].bytes
                    if f0[:4] == P.C[P.CALL]:
                        calls = [(P.CallHeader.read(f0[4:]), frames[1:])]
                    elif f0 == P.C[P.BATCH]:  # several calls in one message, run in order
                        calls = [(h, f) for _, _, h, f in P.unbatch(frames)]
                    elif f0 == P.C[P.WARM] and len(frames) == 3:  # a min_warm function: load it now
                        self.warm(frames[1].bytes, frames[2].bytes)
                        calls = ()
                    elif f0 == P.C[P.MAP_ARENA] and len(frames) == 2:  # a driver's arena: map it now
                        self.map_arena(frames[1].bytes)
                        calls = ()
                    else:
                        calls = ()  # nothing else is for workers; the broker never sends it
                    del frames
                    self.run_in_order(calls)
                # anything else is not for workers; the broker never sends it
            if self.results_in is not None and self.results_in in events:
                while True:  # results and output of the instance's threads, sent from this thread
                    try:
                        P.send(sock, P.recv(self.results_in, 1))
                    except zmq.Again:
                        break

    def run_in_order(self, calls):
        """Run calls one after the other, sending each one's DONE as soon as it is made (a
        concurrent instance's go to its thread pool instead). The id
        of the call running is written to the executor's run file first, so that if this
        process dies the broker blames that call, not the oldest it sent here (whose DONE may
        have died in this process's queue)."""
        sock, mark = self.sock, self.mark
        for head, f in calls:
            if self.pool is not None:  # a concurrent instance (its ACTOR_NEW may be in this BATCH)
                self.pool.submit(self.run_threaded, head, f)
                continue
            cid = head.call_id
            if not self.begin(cid):
                self.skip(head, f)
                continue
            if mark is not None:
                mark[:P.ID_LEN] = cid  # the call id: what this worker runs now
            out = self.run(head, f)
            self.active.discard(cid)
            if mark is not None:
                mark[:P.ID_LEN] = _NO_CALL
            P.send(sock, out)  # its shared-memory mappings are settled once this worker idles

    def begin(self, cid) -> bool:
        """Start call ``cid``, unless the broker dropped it (DROP) before it started."""
        with self.gate:
            n = self.dropped.get(cid) if self.dropped else None
            if n is not None:
                if n > 1:
                    self.dropped[cid] = n - 1
                else:
                    del self.dropped[cid]
                return False
            self.active.add(cid)
            i = self.begun_at
            self.begun[i:i + P.ID_LEN] = cid
            self.begun_at = (i + P.ID_LEN) % len(self.begun)
        return True

    def drop(self, cid, stop=False) -> bytes:
        """(output thread) DROP ``cid``: b"r" it runs now, b"f" it ran (its DONE is sent or being
        made), b"d" it has not started and now never will (it is skipped when it comes). With
        ``stop`` (DROP "k"), a call running now ends this process instead, before the main
        thread can start another: the broker cancelled it, or its driver left."""
        with self.gate:
            if cid in self.active:
                if stop:
                    os._exit(P.EXIT_STOPPED)
                return b"r"
            b, i = self.begun, self.begun.find(cid)
            while i >= 0:
                if i % P.ID_LEN == 0:
                    return b"f"
                i = b.find(cid, i + 1)
            self.dropped[cid] = self.dropped.get(cid, 0) + 1
            return b"d"

    def skip(self, h: P.CallHeader, frames):
        """A dropped call: not run and not answered (the broker gave it its outcome), but the code
        it carries is kept, since the broker sends code to a worker only once."""
        if h.opts & P.HAS_CODE:
            try:
                self.code[h.code_hash] = load_code(frames[0].bytes)
            except Exception as e:  # noqa: BLE001 - its next call reports the failure
                self.code[h.code_hash] = _Unloadable(e)

    # --------------------------------------------------------------- running one call
    def run(self, h: P.CallHeader, frames):
        """Run one call (``h``: its header; ``frames``: what follows its first frame)."""
        if self.pool is not None:  # a concurrent instance's calls share its CPUs: none lends them
            return self._run(h, frames)
        self.lendable = h.call_id  # its waits lend its (or its instance's) CPUs: block()
        try:
            return self._run(h, frames)
        finally:
            if self.blocked:
                self._close_window(end=True)
            else:  # _run closed the user's threads' window: only this thread could start a wait
                self.lendable = None

    def _run(self, h: P.CallHeader, frames):
        cid, code_hash, kind, nbuf, opts = h.call_id, h.code_hash, h.kind, h.nbuf, h.opts
        t0 = time.perf_counter()
        source = self.label
        if h.memory:
            self.watch_memory(h.memory)
        try:
            i = 0
            if opts & P.HAS_CODE:
                i = 1
                try:
                    self.code[code_hash] = load_code(frames[0].bytes)
                except Exception as e:  # noqa: BLE001 - the broker sends code once: remember the failure
                    self.code[code_hash] = _Unloadable(e)
                    raise
            deps = None
            dep_ids = b""
            if opts & P.HAS_DEPS:
                dep_ids = frames[i].bytes
                i += 1
            payload, bufs = frames[i].buffer, [f.buffer for f in frames[i + 1:i + 1 + nbuf]]
            gang = None
            if opts & P.HAS_GANG:  # a gang member's context, after the buffers
                gang = P.loads_json(frames[i + 1 + nbuf].bytes)
                i += 1
            if dep_ids:
                deps, i = {}, i + 1 + nbuf
                for d in P.split_ids(dep_ids):
                    dn = P.unpack_result(frames[i].bytes).nbuf
                    deps[d] = pickling.loads_value(frames[i + 1].buffer, [f.buffer for f in frames[i + 2:i + 2 + dn]])
                    i += 2 + dn
            args, kwargs = pickling.loads_args(payload, bufs, deps)
            del payload, bufs
            if kind == P.TASK or kind == P.GANG:
                fn = self.code[code_hash]
                source = f"{getattr(fn, '__name__', 'fn')} {self.label}"
                if gang is not None:
                    source = f"{getattr(fn, '__name__', 'fn')}[rank {_gang._enter(gang).rank}] {self.label}"
                self.output.local.ctx = (cid[:8], source.encode())
                self.current = cid
                self.threads_lend = self.lendable is not None
                try:
                    value = fn(*args, **kwargs)
                finally:
                    self.current = None
            elif kind == P.ACTOR_CALL:
                name, args = args[0], args[1:]
                source = f"{type(self.instance).__name__}.{name} {self.label}"
                self.output.local.ctx = (cid[:8], source.encode())
                self.threads_lend = self.lendable is not None
                value = getattr(self.instance, name)(*args, **kwargs)
            else:
                value = self.create(self.code[code_hash], args, kwargs, h.concurrency, cid)
            if type(value) not in _PLAIN and inspect.isawaitable(value):
                value = self.await_(value)
            if self.threads_lend:
                self._close_window()
            del args, kwargs
            if opts & P.STREAM:  # a generator: its items go out one by one, then the DONE
                return self.stream(cid, value, h.window or P.STREAM_WINDOW, t0, source, opts, kind == P.TASK)
        except BaseException as e:  # noqa: BLE001 - everything user code raises goes back to the caller
            return self.reply_error(cid, e, t0)
        finally:
            if self.threads_lend:
                self._close_window()
            self.output.local.ctx = None
            if self.instance is None:  # an instance's limit holds for its whole life
                self.mem_limit = 0
        try:
            payload, bufs = pickling.dumps_value(value, transfer_for(self.address), opts & P.STORE_RESULT)
        except SerializationError as e:
            if inspect.isgenerator(value) or inspect.isasyncgen(value):
                e = (f"it is a generator; decorate the generator function itself with @fabric.fn (or make the "
                     f"method a generator) so that .remote() streams its items ({e})")
            return [P.C[P.DONE] + P.pack_result(cid, P.SERIALIZATION, 0, time.perf_counter() - t0),
                    f"the result of {source.split(' ')[0]} cannot be pickled: {e}".encode()]
        flags = P.SHM_FREE if shm.release_mappings() else 0
        out = [P.C[P.DONE] + P.pack_result(cid, P.OK, len(bufs), time.perf_counter() - t0, flags), payload, *bufs]
        self.output.flush_on(self.sock if self.pool is None else self.thread_sock())
        return out

    def interrupt(self, cid):
        """(log thread) Cancel the running call ``cid``: SIGUSR1 to the main thread, whose
        handler raises fabric.Cancelled there (a signal also wakes a sleep or a wait). A
        generator call also stops before its next item."""
        st = self.streams.get(cid)
        if st is not None:
            with st.cond:
                st.cancelled = True
                st.cond.notify()
        if self.current == cid:
            self.interrupted = cid
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def block(self):
        """A nested driver in this process is about to wait for results (fabric.get, .result(),
        fabric.wait, ``await fut``, a Stream's next item). If it waits in the call running here
        (a plain call, or a method of an instance of concurrency 1), tell the broker (BLOCKED):
        it lends the CPUs to other work and prefetches nothing onto this worker meanwhile, so
        calls waiting on calls cannot exhaust the cluster. The main thread's waits lend for the
        whole call; those of the user's own threads while its function runs (so that no other
        thread sends while the main thread streams items). Returns a token for ``unblock()``,
        or None: not told. Waits in a concurrent instance keep its CPUs (its calls share them)."""
        cid = self.lendable
        if cid is None:
            return None
        main = threading.current_thread() is threading.main_thread()
        with self.block_lock:
            if self.lendable != cid or not (main or self.threads_lend):
                return None
            self.blocked += 1
            if self.blocked == 1:
                self.blocked_cid = cid
                self.sock.send_multipart([P.C[P.BLOCKED], cid])
        return cid

    def unblock(self, token=None):
        """The wait ``block()`` announced is over: the call takes its CPUs back (UNBLOCKED)
        when no other wait of it goes on. A token of a window closed meanwhile does nothing."""
        with self.block_lock:
            if token is None or token != self.blocked_cid or not self.blocked:
                return
            self.blocked -= 1
            if self.blocked == 0:
                self.blocked_cid = None
                self.sock.send_multipart([P.C[P.UNBLOCKED], token])

    def _close_window(self, end=False):
        """(main thread) The call's function returned: the user's threads lend no more; one of
        them still waiting gives the CPUs back now. ``end``: the call is over."""
        with self.block_lock:
            self.threads_lend = False
            if end:
                self.lendable = None
            if self.blocked and (end or threading.current_thread() is threading.main_thread()):
                cid, self.blocked, self.blocked_cid = self.blocked_cid, 0, None
                self.sock.send_multipart([P.C[P.UNBLOCKED], cid])

    def _on_sigusr1(self, signum, frame):
        cid, self.interrupted = self.interrupted, None
        if cid is not None and cid == self.current:
            from ..errors import Cancelled

            raise Cancelled("this call was cancelled by fabric.cancel()")

    def stream(self, cid, gen, window, t0, source, opts, plain):
        """Run a generator call: each item goes out as an ITEM as soon as it is made, and the
        generator pauses while ``window`` items are not yet taken by the consumer (its driver's
        CONSUMED counts reach the output thread) and stops at a cancel. The DONE carries the
        number of items, or the error raised at the item where it was raised."""
        sock = self.sock if self.pool is None else self.thread_sock()
        name = source.split(" ")[0]
        agen = hasattr(gen, "__anext__")
        if not agen:
            try:
                gen = iter(gen)
            except TypeError:
                raise TypeError(f"{name} was called as a stream but returned {type(gen).__name__}, "
                                f"not a generator") from None
        st = self.streams[cid] = _Stream()
        transfer, store = transfer_for(self.address), opts & P.STORE_RESULT
        n = 0
        try:
            while True:
                if n - st.consumed >= window:  # backpressure: wait for the consumer
                    with st.cond:
                        while n - st.consumed >= window and not st.cancelled:
                            st.cond.wait(1.0)
                            if os.getppid() != self.ppid:
                                os._exit(0)  # our executor is gone
                if st.cancelled:
                    break
                if plain:
                    self.current = cid  # fabric.cancel raises Cancelled in the generator's code
                try:
                    item = self.await_(gen.__anext__()) if agen else next(gen)
                except (StopIteration, StopAsyncIteration):
                    break
                finally:
                    self.current = None
                try:
                    payload, bufs = pickling.dumps_value(item, transfer, store)
                except SerializationError as e:
                    return [P.C[P.DONE] + P.pack_result(cid, P.SERIALIZATION, 0, time.perf_counter() - t0),
                            f"item {n} of {name} cannot be pickled: {e}".encode()]
                del item
                P.send(sock, [P.C[P.ITEM] + P.pack_result(cid, P.OK, len(bufs)) + n.to_bytes(8, "big"),
                              payload, *bufs])
                n += 1
        finally:
            self.streams.pop(cid, None)
            close = getattr(gen, "aclose" if agen else "close", None)
            if close is not None:  # its finally blocks run now, also when the consumer stopped
                try:
                    self.await_(close()) if agen else close()
                except Exception:  # noqa: BLE001 - the stream's own outcome is what counts
                    pass
        payload, bufs = pickling.dumps_value(n)
        self.output.flush_on(sock)
        return [P.C[P.DONE] + P.pack_result(cid, P.OK, 0, time.perf_counter() - t0), payload]

    def consumed(self, cid, count):
        """(output thread) The driver has taken ``count`` items of stream ``cid``."""
        st = self.streams.get(cid)
        if st is not None:
            with st.cond:
                if count > st.consumed:
                    st.consumed = count
                    st.cond.notify()

    def warm(self, code_hash, code):
        """Load a function's code before its first call (its min_warm), importing its modules."""
        try:
            self.code[code_hash] = load_code(code)
        except Exception as e:  # noqa: BLE001 - its first call reports the failure
            self.code[code_hash] = _Unloadable(e)

    @staticmethod
    def map_arena(raw: bytes) -> None:
        """MAP_ARENA: while idle, map the driver's arena its next large argument is copied into
        (shm.map_arena checks the file; a message it cannot use is ignored: it is only a hint)."""
        try:
            info = P.loads_json(raw)
        except Exception:  # noqa: BLE001 - the broker checked it; a worker never fails on a hint
            return
        shm.map_arena(info.get("path"), info.get("bytes"))

    def watch_memory(self, limit):
        """Enforce ``memory=``: a thread ends this process, with EXIT_MEMORY, as soon as its private
        memory passes the limit, so a runaway call is stopped before it can freeze the host. Started
        at the first call that has a limit: workers that never see one pay nothing."""
        self.mem_limit = limit
        if self.mem_thread is None and os.path.exists("/proc/self/statm"):
            self.mem_thread = threading.Thread(target=self._memory_watch, name="fabric-memory", daemon=True)
            self.mem_thread.start()

    def _memory_watch(self):
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm", "rb") as f:
            while True:
                time.sleep(MEMORY_POLL)
                limit = self.mem_limit
                if not limit:
                    continue
                f.seek(0)
                fields = f.read().split()
                private = (int(fields[1]) - int(fields[2])) * page  # resident less file-backed/shared
                if private > limit:
                    os.write(2, f"fabric worker: {private >> 20} MiB in use is more than the call's memory limit of "
                                f"{limit >> 20} MiB; stopping this worker\n".encode())
                    os._exit(P.EXIT_MEMORY)

    def reply_error(self, cid, e, t0):
        self.output.flush_on(self.sock if self.pool is None else self.thread_sock())
        return [P.C[P.DONE] + P.pack_result(cid, P.USER_ERROR, 0, time.perf_counter() - t0), pickling.dumps_error(e)]

    def create(self, cls, args, kwargs, concurrency, cid):
        """Build the instance, run its @fabric.enter methods, start its thread pool if concurrent."""
        self.label = f"pid={os.getpid()}"
        self.output.local.ctx = (cid[:8], f"{cls.__name__} {self.label}".encode())
        self.instance = cls(*args, **kwargs)
        for name in dir(type(self.instance)):
            attr = getattr(type(self.instance), name, None)
            if callable(attr) and getattr(attr, "__fabric_enter__", False):
                r = getattr(self.instance, name)()
                if inspect.isawaitable(r):
                    self.await_(r)
        if concurrency > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fabric-call")
            self.tls = threading.local()
            results_in = self.ctx.socket(zmq.PULL)
            results_in.bind(f"inproc://results-{id(self)}")
            self.results_in = results_in
        return None

    def await_(self, aw):
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            if self.pool is not None:
                threading.Thread(target=self.loop.run_forever, daemon=True).start()
        if self.pool is not None:
            return asyncio.run_coroutine_threadsafe(_as_coro(aw), self.loop).result()
        return self.loop.run_until_complete(aw)

    # --------------------------------------------------------------- concurrent instances
    def thread_sock(self):
        s = getattr(self.tls, "sock", None)
        if s is None:
            s = self.tls.sock = self.ctx.socket(zmq.PUSH)
            s.connect(f"inproc://results-{id(self)}")
        return s

    def run_threaded(self, head, frames):
        cid = head.call_id
        if not self.begin(cid):
            return self.skip(head, frames)
        out = self.run(head, frames)
        self.active.discard(cid)
        P.send(self.thread_sock(), out)


def listen_address(broker: str) -> str:
    """``"host:port"`` where this process could listen: the address of this host that routes
    to the broker (``FABRIC_NODE_IP`` overrides it; loopback for an ``ipc://`` or loopback
    broker), and a port that is free now. Gang members get their peers' (docs/gangs.md)."""
    host = settings.get().node_ip or "127.0.0.1"
    if not settings.get().node_ip and broker.startswith("tcp://"):
        bhost = broker[6:].rpartition(":")[0].strip("[]")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(bhost, 1, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)  # sends nothing: only picks the interface that routes there
                host = s.getsockname()[0]
        except OSError:
            pass
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    except OSError:
        port = 0
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Stream:
    """A generator call running here: how many items its consumer took; cancelled?"""

    __slots__ = ("consumed", "cancelled", "cond")

    def __init__(self):
        self.consumed, self.cancelled, self.cond = 0, False, threading.Condition()


class _Unloadable:
    """Stands in for code that failed to unpickle here, so every call of it gets that error."""

    def __init__(self, exc):
        self.exc, self.__name__ = exc, "unloadable"

    def __call__(self, *a, **k):
        raise self.exc


async def _as_coro(aw):
    return await aw


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.executor.worker")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--executor-id", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--kind", default="pool", choices=["pool", "spawned"])
    ap.add_argument("--token")
    ap.add_argument("--credit", type=int, default=1)
    a = ap.parse_args(argv)
    config.user_umask()  # user code keeps the user's umask; what fabric writes here has explicit modes
    _die_with_parent()
    executor = int(settings.get().executor_pid or 0)
    if executor and os.getppid() != executor:  # it died before the death signal was armed
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver's terminal
    w = Worker(a.broker, bytes.fromhex(a.executor_id), a.n, a.kind, a.token, a.credit)
    signal.signal(signal.SIGUSR1, w._on_sigusr1)
    config.quiet_gc()
    try:
        w.serve()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
