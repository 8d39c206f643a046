"""The named call and result headers: what goes on the wire is what is read back, by name."""
import pytest

from fabric import protocol as P
from fabric.errors import ProtocolError


def test_call_header_round_trips_by_name():
    h = P.CallHeader(call_id=b"d" * 16, code_hash=b"h" * 16, kind=P.ACTOR_NEW, actor_id=b"a" * 16, cpus=1.5,
                     gpus=0.25, memory=1 << 30, retries=3, timeout=2.5, nbuf=4, max_containers=7, min_warm=2,
                     concurrency=8, window=0, opts=P.HAS_DEPS)
    b = h.pack()
    assert len(b) == P.CALL_HDR.size == 92
    assert P.CallHeader.read(b) == h and P.unpack_call(b).concurrency == 8
    assert P.CallHeader.of(*h) == h
    assert P.CallHeader.read(h.pack(P.HAS_CODE)).opts == P.HAS_DEPS | P.HAS_CODE
    assert b[-1] == P.HAS_DEPS  # opts is the last byte: the broker sets HAS_CODE in place
    assert P.pack_call(*h[:10], max_containers=7, min_warm=2, concurrency=8, opts=P.HAS_DEPS) == b


def test_concurrency_and_window_are_separate_fields():
    stream = P.CallHeader.read(P.pack_call(bytes(16), bytes(16), P.TASK, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 0,
                                           window=5, opts=P.STREAM))
    assert (stream.window, stream.concurrency) == (5, 0)


def test_result_header_reads_from_a_command_frame():
    r = P.ResultHeader(b"c" * 16, P.OK, 2, 0.5, P.SHM_FREE)
    frame = P.C[P.RESULT] + r.pack()
    assert P.ResultHeader.read(frame, 4) == r
    assert P.unpack_result(r.pack()).flags == P.SHM_FREE
    item = P.C[P.ITEM] + P.pack_result(b"c" * 16, P.OK) + (9).to_bytes(8, "big")
    assert P.item_index(item[4:]) == 9 and P.ResultHeader.read(item, 4).call_id == b"c" * 16


def test_bad_headers_say_what_is_wrong():
    with pytest.raises(ProtocolError, match="call header must be 92 bytes, got 91"):
        P.CallHeader.read(bytes(91))
    with pytest.raises(ProtocolError, match="result header must be 28 bytes"):
        P.unpack_result(bytes(27))
    with pytest.raises(ProtocolError, match="protocol version 2 is not supported"):
        P.command_of(b"FB\x02\x02" + bytes(91))
    assert P.command_of(P.C[P.SUBMIT] + bytes(92)) == P.SUBMIT
