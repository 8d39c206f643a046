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


def _through(pool, a):
    """One call's argument path: the driver copies ``a`` into a pooled file, the 'worker' (this
    process) maps it; returns the file's path and what the worker sees."""
    used: list = []
    payload, bufs = serde.dumps_args((a,), {}, shm_pool=pool, shm_used=used)
    (back,), _ = serde.loads_args(payload, bufs)
    return used, back


def test_a_worker_keeps_its_mapping_of_a_file_it_may_see_again(tmp_path):
    """A kept mapping saves the page faults of the next array the driver writes into the same
    file, and shows that array's bytes, not the last one's."""
    pool = serde.ShmPool(str(tmp_path), arena=0)
    n = serde.SHM_THRESHOLD // 8 + 1000
    try:
        maps = []
        for i in range(3):
            used, back = _through(pool, np.full(n, float(i)))
            assert used[0][1] not in shm._kept  # this call has it
            assert back.min() == back.max() == float(i)  # the driver's new bytes, through the kept pages
            del back
            assert serde.release_mappings()
            shm.settle()  # (the worker runs it after sending the call's DONE)
            maps.append(shm._kept[used[0][1]])
            pool.give_back(used, True)
        assert maps[0] is maps[1] is maps[2]  # one mapping served the three calls
        # the driver removes the file: its kept mapping goes at the next check
        pool.give_back([pool.take(n * 8)], False)
        assert not os.listdir(tmp_path)
        shm.forget_removed(every=0)
        assert used[0][1] not in shm._kept
    finally:
        pool.close()


def test_a_mapping_the_call_wrote_to_is_not_kept(tmp_path):
    """A written page is the worker's own copy: kept, it would show the old call's bytes where
    the driver wrote the next array. So the mapping goes, and the next call maps afresh."""
    pool = serde.ShmPool(str(tmp_path), arena=0)
    n = serde.SHM_THRESHOLD // 8 + 1000
    try:
        used, back = _through(pool, np.zeros(n))
        back[n // 2] = -1.0  # one page in the middle
        del back
        assert serde.release_mappings()  # the file is still the driver's to reuse
        shm.settle()
        assert used[0][1] not in shm._kept
        pool.give_back(used, True)
        used, back = _through(pool, np.ones(n))
        assert back.min() == back.max() == 1.0
        del back
        assert serde.release_mappings()
        shm.settle()
        assert used[0][1] in shm._kept
        pool.give_back(used, True)
    finally:
        pool.close()
        shm.forget_removed(every=0)


def test_the_next_argument_settles_what_the_last_call_let_go_of(tmp_path):
    """settle() runs after the DONE is sent; a next argument that comes first runs it itself,
    so a written mapping is never handed to the next call."""
    pool = serde.ShmPool(str(tmp_path), arena=0)
    n = serde.SHM_THRESHOLD // 8 + 1000
    try:
        used, back = _through(pool, np.zeros(n))
        back[::512] = -1.0
        del back
        assert serde.release_mappings() and shm._settling
        pool.give_back(used, True)
        used, back = _through(pool, np.full(n, 2.0))  # no settle() in between
        assert not shm._settling and back.min() == back.max() == 2.0
        del back
        assert serde.release_mappings()
        pool.give_back(used, True)
    finally:
        pool.close()
        shm.forget_removed(every=0)


def test_where_page_states_cannot_be_read_no_mapping_is_kept(tmp_path, monkeypatch):
    """No /proc/self/pagemap (or one that shows no page states): a written page could not be
    told, so every mapping goes after its call, as before mappings were kept."""
    monkeypatch.setattr(shm, "_pagemap", {os.getpid(): None})
    pool = serde.ShmPool(str(tmp_path), arena=0)
    try:
        used, back = _through(pool, np.ones(serde.SHM_THRESHOLD // 8 + 1))
        del back
        assert serde.release_mappings()
        shm.settle()
        assert used[0][1] not in shm._kept
        pool.give_back(used, True)
    finally:
        pool.close()


def test_a_mapping_user_code_still_views_is_neither_kept_nor_reused(tmp_path):
    pool = serde.ShmPool(str(tmp_path), arena=0)
    try:
        used, back = _through(pool, np.arange(serde.SHM_THRESHOLD // 8 + 1, dtype=np.float64))
        part = back[10:20]  # a view of a view: it holds the mapping too
        del back
        assert not serde.release_mappings()
        assert used[0][1] not in shm._kept and part[0] == 10.0
        pool.give_back(used, False)
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


# --- a driver's arena, mapped ahead by idle workers (ARENA / MAP_ARENA, broker/arenas.py) ----
ARENA = 4 << 20


@pytest.fixture
def arena_pool():
    """A driver's pool in /dev/shm (where MAP_ARENA looks) with a small arena, once it is made."""
    from conftest import wait_for

    pool = serde.ShmPool("/dev/shm", arena=ARENA)
    try:
        assert wait_for(lambda: pool.arena_ready)
        yield pool
    finally:
        pool.close()
        shm.forget_removed(every=0)


def test_a_drivers_arena_appears_whole_under_its_name(arena_pool):
    """Made under another name and renamed: a worker told of it finds it whole or not at all."""
    assert arena_pool.arena_ready == ARENA and os.stat(arena_pool.arena_path).st_size == ARENA
    mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"fabric-{os.getpid()}-")]
    assert mine == [os.path.basename(arena_pool.arena_path)]  # no half-made file left beside it


def test_an_arena_mapped_ahead_serves_the_first_argument_written_into_it(arena_pool):
    path = arena_pool.arena_path
    assert shm.map_arena(path, ARENA)
    mm = shm._kept[path]
    assert not shm._written(mm, ARENA)  # the file's own pages, mapped, none copied
    n = ARENA // 8 - 1000
    assert n * 8 >= serde.SHM_THRESHOLD
    for value in (7.0, -2.5):  # the driver writes one array, then the next, into the arena
        used, back = _through(arena_pool, np.full(n, value))
        assert used[0][1] == path and back.min() == back.max() == value
        del back
        assert serde.release_mappings()
        shm.settle()
        assert shm._kept[path] is mm  # the mapping made ahead read both arrays
        arena_pool.give_back(used, True)
    assert shm.map_arena(path, ARENA) and shm._kept[path] is mm  # told again: nothing to do


def test_map_arena_maps_only_a_whole_fabric_file_of_this_user(arena_pool, tmp_path):
    """MAP_ARENA is a hint a driver's message leads to: anything but a ``fabric-*`` regular file
    of this user under /dev/shm, of the size said, is ignored, and nothing blocks on a FIFO."""
    path = arena_pool.arena_path
    made = []
    try:
        fifo = f"/dev/shm/fabric-{os.getpid()}-{os.urandom(6).hex()}"
        os.mkfifo(fifo, 0o600)
        link = f"/dev/shm/fabric-{os.getpid()}-{os.urandom(6).hex()}"
        os.symlink(path, link)
        other = f"/dev/shm/fabric-{os.getpid()}-{os.urandom(6).hex()}"
        with open(other, "wb") as f:
            f.truncate(ARENA)
        made += [fifo, link, other]
        refused = [(path, ARENA + 1), (path, ARENA - 1), (path, str(ARENA)), (path, True), (path, 0), (path, -1),
                   (path, 1 << 40), (path, None), (None, ARENA), (123, ARENA), (path + "/x", ARENA),
                   (str(tmp_path / os.path.basename(path)), ARENA), ("/etc/passwd", os.stat("/etc/passwd").st_size),
                   (path.replace("fabric-", "other-"), ARENA), ("/dev/shm/../shm/" + os.path.basename(path), ARENA),
                   (fifo, 0), (fifo, ARENA), (link, ARENA)]
        if os.getuid() == 0:  # root may give a file away: one of another user is not mapped
            os.chown(other, 12345, -1)
            refused.append((other, ARENA))
        for p, n in refused:
            assert not shm.map_arena(p, n), (p, n)
        assert path not in shm._kept and not any(m in shm._kept for m in made)
        assert shm.map_arena(path, ARENA)  # and the arena itself still is
    finally:
        for m in made:
            os.unlink(m)


def test_a_driver_no_broker_takes_leaves_no_shared_memory_behind(tmp_path):
    """The pool (and its arena file) is made once the broker took the driver: a refused or
    unanswered driver leaves nothing in /dev/shm (no later driver of its user might sweep it)."""
    import time

    from fabric.connection import Client
    from fabric.errors import ConnectionFailed

    def mine():
        return {n for n in os.listdir("/dev/shm") if n.startswith(f"fabric-{os.getpid()}-")}

    before = mine()
    with pytest.raises(ConnectionFailed, match="no fabric broker answered"):
        Client(f"ipc://{tmp_path}/no-broker", shm=True, connect_timeout=0.3)
    time.sleep(0.5)  # (an arena would be made within ~0.1 s)
    assert mine() == before
