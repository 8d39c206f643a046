"""A real worker's side of DROP (docs/protocol.md §5.1), with the broker played on a real
ROUTER socket: the orders that matter cannot be forced through a real broker.

The case this guards (issue 18, a CI deadlock): a call prefetched behind a call that waits on
nested calls is taken back (DROP, answered d), requeued, sent to the same worker again before
the worker read its first copy, and taken back again. Each copy must be skipped: a worker that
remembered only "this id is dropped" skipped the first copy and ran the second, a call the
broker had given to another worker (it ran twice, and the broker, thinking this worker idle,
queued work behind it)."""
import os
import subprocess
import sys
import time

import pytest
import zmq

from fabric import protocol as P
from fabric import serde


def _marks():
    """The worker's function (made here, so it is pickled by value): appends ``tag`` to
    ``path``; while ``path + '.hold'`` exists the head call waits first, keeping the worker's
    main thread busy."""
    def marks(path, tag):
        import os as _os
        import time as _time

        while tag == "head" and _os.path.exists(path + ".hold"):
            _time.sleep(0.01)
        with open(path, "a") as f:
            f.write(tag + "\n")
        return tag
    return marks


class PlayedBroker:
    def __init__(self, tmp_path):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{tmp_path}/b.sock"
        self.sock.bind(self.address)
        self.ex_id = os.urandom(8)
        self.wid, self.lid = P.worker_id(self.ex_id, 1), P.log_id(self.ex_id, 1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
        env["HOME"] = str(tmp_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabric.executor.worker", "--broker", self.address,
             "--executor-id", self.ex_id.hex(), "--n", "1", "--credit", "16"], env=env)
        self.code, self.hash = serde.code_blob(_marks())
        self.seq = 0
        self.backlog = []
        m = self.recv(self.wid)
        assert m[0] == P.C[P.READY], m

    def recv(self, ident, timeout=30.0):
        """The next message from ``ident`` (the worker's call socket or its output socket)."""
        for i, m in enumerate(self.backlog):
            if m[0] == ident:
                return self.backlog.pop(i)[1:]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                m = self.sock.recv_multipart()
                if m[0] == ident:
                    return m[1:]
                self.backlog.append(m)
        raise AssertionError(f"nothing from {ident[:1]!r} within {timeout}s")

    def new_id(self):
        self.seq += 1
        return b"d" * 8 + self.seq.to_bytes(8, "big")

    def call(self, cid, path, tag, code=False):
        payload, bufs = serde.dumps_args((path, tag), {})
        hdr = P.pack_call(cid, self.hash, P.TASK, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, len(bufs),
                          opts=P.HAS_CODE if code else 0)
        self.sock.send_multipart([self.wid, P.C[P.CALL] + hdr, *([self.code] if code else []), payload, *bufs])

    def drop(self, cid):
        self.sock.send_multipart([self.lid, P.C[P.DROP], cid])
        m = self.recv(self.lid)
        assert m[0] == P.C[P.DROPPED] and m[1] == cid, m
        return m[2]

    def done(self):
        m = self.recv(self.wid)
        assert m[0][:4] == P.C[P.DONE], m
        r = P.ResultHeader.read(m[0][4:])
        assert r.status == P.OK, m
        return r.call_id

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.ctx.destroy(linger=0)


@pytest.fixture
def played(tmp_path):
    b = PlayedBroker(tmp_path)
    yield b
    b.close()


def test_each_copy_of_a_call_taken_back_twice_is_skipped(played, tmp_path):
    out = str(tmp_path / "ran")
    open(out + ".hold", "w").close()
    head, twice, last = played.new_id(), played.new_id(), played.new_id()
    played.call(head, out, "head", code=True)
    played.call(twice, out, "twice")
    assert played.drop(twice) == b"d"   # taken back: requeued by the broker...
    played.call(twice, out, "twice")     # ...and sent here again before the first copy was read
    assert played.drop(twice) == b"d"   # taken back again: it runs elsewhere
    os.remove(out + ".hold")
    assert played.done() == head
    played.call(last, out, "last")       # the worker serves on: the next call runs
    assert played.done() == last
    with open(out) as f:
        assert f.read().split() == ["head", "last"]  # neither copy of `twice` ran here


def test_a_call_taken_back_and_sent_again_runs_once(played, tmp_path):
    """The other order: one DROP, two copies (the second one is the broker's to run here)."""
    out = str(tmp_path / "ran")
    open(out + ".hold", "w").close()
    head, again = played.new_id(), played.new_id()
    played.call(head, out, "head", code=True)
    played.call(again, out, "again")
    assert played.drop(again) == b"d"
    played.call(again, out, "again")
    os.remove(out + ".hold")
    assert played.done() == head
    assert played.done() == again
    assert played.drop(again) == b"f"  # it ran: a late DROP says finished
    with open(out) as f:
        assert f.read().split() == ["head", "again"]
