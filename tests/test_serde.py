"""fabric.serde as a package: the names on the wire, and the shared-memory path end to end
in one process (the cluster tests cover it across processes: test_api, test_store_transfer)."""
from __future__ import annotations

import os
import pickle
import pickletools
import threading

import numpy as np
import pytest

from fabric import SerializationError, serde
from fabric.serde import pickling, shm, transfer


def _globals(payload: bytes) -> set[str]:
    """The ``module name`` pairs a pickle imports, as pickletools reads them."""
    out, strings = set(), []
    for op, arg, _ in pickletools.genops(payload):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]} {strings[-1]}")
        elif op.name == "GLOBAL":
            out.add(arg)
    return out


def test_payloads_call_the_names_protocol_md_gives():
    """docs/protocol.md section 4.6: fabric.serde._dep, _dep_part, _shm_ndarray, _unspill, whichever
    module of the package defines them; a worker resolves each through the package."""
    for f in (serde._dep, serde._dep_part, serde._shm_ndarray, serde._unspill):
        assert f"fabric.serde {f.__name__}" in _globals(pickle.dumps(f, protocol=5))
    assert serde._dep is pickling._dep and serde._shm_ndarray is shm._shm_ndarray
    assert serde._unspill is transfer._unspill


def test_a_big_array_goes_through_shared_memory_and_its_file_is_reused(tmp_path):
    pool = serde.ShmPool(str(tmp_path), arena=0)
    try:
        a = np.arange(serde.SHM_THRESHOLD // 8 + 1, dtype=np.float64).reshape(-1, 1)
        used: list = []
        payload, bufs = serde.dumps_args((a,), {}, shm_pool=pool, shm_used=used)
        assert "fabric.serde _shm_ndarray" in _globals(payload) and bufs == []  # no array bytes inline
        assert len(used) == 1 and os.path.dirname(used[0][1]) == str(tmp_path)
        (back,), _ = serde.loads_args(payload, bufs)
        assert np.array_equal(back, a)
        back[0, 0] = -1.0  # a private mapping: the driver's copy is not changed
        assert used[0][2][:8] == np.float64(0).tobytes()
        del back
        assert serde.release_mappings()  # nothing holds the mapping: the file can be reused
        pool.give_back(used, True)
        again: list = []
        serde.dumps_args((a,), {}, shm_pool=pool, shm_used=again)
        assert again[0][1] == used[0][1]
        pool.give_back(again, False)
        assert not os.listdir(tmp_path)
    finally:
        pool.close()


def test_remove_shm_removes_one_drivers_files_only(tmp_path):
    mine, other = tmp_path / "fabric-4242-aa", tmp_path / "fabric-4243-bb"
    mine.write_bytes(b"x")
    other.write_bytes(b"y")
    shm.remove_shm(4242, str(tmp_path))
    assert not mine.exists() and other.exists()


def test_small_simple_arguments_take_plain_pickle():
    payload, bufs = serde.dumps_args((1, "x", None), {"k": 2.5})
    assert bufs == [] and not any("cloudpickle" in g for g in _globals(payload))
    assert serde.loads_args(payload, bufs) == ((1, "x", None), {"k": 2.5})


def test_an_unpicklable_argument_is_named():
    with pytest.raises(SerializationError, match="argument 1 of type _thread.lock"):
        serde.dumps_args((1, threading.Lock()), {})
