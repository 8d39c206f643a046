"""Large objects through the object store instead of the broker, on real processes.

``FABRIC_TRANSFER=store`` makes this one host behave, for transfers, like a driver whose
executors are on other hosts: large arguments, results and ``fabric.put`` objects are written
to the cluster store (a ``file://`` folder, or S3 served by moto) under their content hash, and
each host fetches an object once into its cache (``FABRIC_CACHE_DIR``) and maps it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
import uuid

import numpy as np
import pytest

import fabric
from fabric import protocol, serde, storage
from fabric.serde import transfer
from fabric.storage import KeyNotFound, Store, objects
from conftest import start_moto, stop_moto
from test_storage import AWS_ENV, BUCKET, S3_SKIP

MB = 1 << 20


# --- functions the tests call --------------------------------------------------------------
@fabric.fn
def digest(a):
    """What arrived: its hash, shape, dtype and the worker that saw it."""
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest(), a.shape, a.dtype.str


@fabric.fn
def slow_digest(a, wait=0.3):
    time.sleep(wait)  # so that both workers take some of the calls
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest(), os.getpid()


@fabric.fn
def make(seed, n):
    return np.random.default_rng(seed).random(n)


@fabric.fn
def mutate_and_sum(a):
    a[0] = -1e9  # the mapping is private: this must change neither the cache nor the driver's array
    return float(a.sum())


@fabric.fn
def total(parts):
    return [float(p.sum()) for p in parts]


def h(a) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def fresh(nbytes: int) -> np.ndarray:
    """An array whose content no earlier test has sent (so no cache holds it)."""
    return np.random.default_rng(int.from_bytes(os.urandom(8), "big")).random(nbytes // 8)


# --- the clusters: one with a file:// store, one with S3 (moto) -----------------------------
class Env:
    def __init__(self, kind, store: Store, cache: str, endpoint=None, recording=None):
        self.kind, self.store, self.cache, self.endpoint, self.recording = kind, store, cache, endpoint, recording

    def objects(self) -> set[str]:
        return set(self.store.ls("objects"))

    def cached(self) -> set[str]:
        return {n for n in os.listdir(self.cache) if not n.startswith(".") and not n.endswith(".lock")}

    def moto(self, action: str) -> str:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}",
                                     method="GET" if action.startswith("download") else "POST")
        return urllib.request.urlopen(req, timeout=10).read().decode()

    def gets(self, key: str) -> int:
        """GET requests moto served for ``key`` since the recording started."""
        n = 0
        for line in self.moto("download-recording").splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry["method"] == "GET" and entry["url"].split("?")[0].endswith("/" + key):
                    n += 1
        return n


@pytest.fixture(scope="module", params=["file", "s3"])
def env(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"transfer-{kind}")
    proc = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FABRIC_TRANSFER", "store")
        mp.setenv("FABRIC_CACHE_DIR", str(tmp / "cache"))
        mp.delenv("FABRIC_STORE_THRESHOLD", raising=False)
        mp.delenv("FABRIC_CACHE_BYTES", raising=False)
        if kind == "file":
            url = f"file://{tmp}/store"
            mp.setenv("FABRIC_STORE", url)
            mp.delenv("FABRIC_STORE_OPTIONS", raising=False)
            e = Env(kind, Store(url), str(tmp / "cache"))
        else:
            if S3_SKIP:
                pytest.skip(S3_SKIP)
            for k, v in AWS_ENV.items():
                mp.setenv(k, v)
            for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(k, raising=False)
            proc, endpoint = start_moto({"MOTO_RECORDER_FILEPATH": str(tmp / "moto-recording.jsonl")})
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            url = f"s3://{BUCKET}/{uuid.uuid4().hex}"
            mp.setenv("FABRIC_STORE", url)
            mp.setenv("FABRIC_STORE_OPTIONS", json.dumps({"endpoint_url": endpoint}))
            e = Env(kind, Store(url, endpoint_url=endpoint), str(tmp / "cache"), endpoint)
        storage.set_default(None)
        fabric.shutdown()
        try:
            fabric.init(num_cpus=2)
            yield e
        finally:
            fabric.shutdown()
            if proc is not None:
                stop_moto(proc)


# --- through the store, end to end ---------------------------------------------------------
def test_large_argument_arrives_intact(env):
    a = fresh(50 * MB)
    before = env.objects()
    assert digest.remote(a).result(timeout=120) == (h(a), a.shape, a.dtype.str)
    new = env.objects() - before
    assert new == {objects.key_of(a)}  # the array itself, under its content hash
    assert objects.key_of(a).split("/")[1] in env.cached()

    f = np.asfortranarray(fresh(16 * MB).reshape(1024, -1))  # Fortran order keeps its layout
    assert digest.remote(f).result(timeout=120) == (h(f), f.shape, f.dtype.str)
    s = fresh(20 * MB)[::2]  # not contiguous: pickled in-band, so the payload itself is spilled
    assert digest.remote(s).result(timeout=120) == (h(s), s.shape, s.dtype.str)


def test_the_broker_never_sees_the_bytes(env, monkeypatch):
    sent, received = [], []
    real_send, real_loads = protocol.send, serde.loads_value

    def send(sock, parts, flags=0):
        sent.append(sum(memoryview(p).nbytes for p in parts))
        return real_send(sock, parts, flags)

    def loads_value(payload, buffers):
        received.append(memoryview(payload).nbytes + sum(memoryview(b).nbytes for b in buffers))
        return real_loads(payload, buffers)

    monkeypatch.setattr(protocol, "send", send)
    monkeypatch.setattr(serde, "loads_value", loads_value)
    a = fresh(20 * MB)
    assert digest.remote(a).result(timeout=120)[0] == h(a)
    seed = int.from_bytes(os.urandom(4), "big")
    assert make.remote(seed, 20 * MB // 8).result(timeout=120).nbytes == 20 * MB
    assert sent and max(sent) < 64 * 1024  # what the driver sent to the broker
    assert received and max(received) < 64 * 1024  # what the broker sent back


def test_argument_mapping_is_private(env):
    a = fresh(12 * MB)
    expect = float(a.sum()) - float(a[0]) - 1e9
    assert mutate_and_sum.remote(a).result(timeout=120) == pytest.approx(expect)
    assert mutate_and_sum.remote(a).result(timeout=120) == pytest.approx(expect)  # the cache is intact
    assert a[0] != -1e9


def test_same_array_is_fetched_once_per_host(env):
    a = fresh(50 * MB)
    key = objects.key_of(a)
    if env.kind == "s3":
        objects.upload(env.store, a)  # upload first, so the recording holds only what workers fetch
        env.moto("reset-recording")
        env.moto("start-recording")
    try:
        futs = [slow_digest.remote(a) for _ in range(8)]
        out = [f.result(timeout=180) for f in futs]
    finally:
        if env.kind == "s3":
            env.moto("stop-recording")
    assert {d for d, _ in out} == {h(a)}
    assert len({pid for _, pid in out}) == 2, "both workers should have taken calls"
    assert key.split("/")[1] in env.cached()
    if env.kind == "s3":
        assert env.gets(key) == 1  # 8 calls, 2 worker processes, one download
    # Whatever reads it next on this host reads the cache, not the store.
    env.store.delete(key)
    assert {d for d, _ in fabric.get([slow_digest.remote(a, 0.05) for _ in range(4)], timeout=120)} == {h(a)}


def test_large_result_comes_back_intact(env):
    seed, n = int.from_bytes(os.urandom(4), "big"), 50 * MB // 8
    before = env.objects()
    r = make.remote(seed, n).result(timeout=120)
    assert np.array_equal(r, np.random.default_rng(seed).random(n))
    assert env.objects() - before == {objects.key_of(r)}  # it came through the store
    r[0] = 5.0  # a private mapping: writable, and the cache does not change
    assert make.remote(seed, n).result(timeout=120)[0] != 5.0


def test_large_result_as_argument_of_another_call(env):
    seed, n = int.from_bytes(os.urandom(4), "big"), 10 * MB // 8
    expect = np.random.default_rng(seed).random(n)
    assert digest.remote(make.remote(seed, n)).result(timeout=120) == (h(expect), expect.shape, expect.dtype.str)


def test_put_spills_and_works_as_argument(env):
    a = fresh(30 * MB)
    before = env.objects()
    ref = fabric.put(a)
    assert env.objects() - before == {objects.key_of(a)}
    assert ref.result() is a  # the driver keeps its own object
    outs = fabric.get([digest.remote(ref) for _ in range(3)], timeout=120)
    assert outs == [(h(a), a.shape, a.dtype.str)] * 3
    assert digest.remote(ref).result(timeout=120)[0] == h(a)


def test_many_small_buffers_are_packed_into_one_object(env):
    parts = [fresh(MB) for _ in range(12)]  # each under the threshold, 12 MiB together
    before = env.objects()
    assert total.remote(parts).result(timeout=120) == pytest.approx([float(p.sum()) for p in parts])
    assert len(env.objects() - before) == 1


def test_missing_object_is_a_clear_error(env):
    a = fresh(10 * MB)
    ref = fabric.put(a)
    key = objects.key_of(a)
    env.store.delete(key)
    with pytest.raises(KeyNotFound, match=key) as info:  # (not a GetTimeout: it fails, it does not hang)
        digest.remote(ref).result(timeout=60)
    assert "FABRIC_STORE" in str(info.value)


def test_corrupt_object_is_a_clear_error(env):
    a = fresh(10 * MB)
    ref = fabric.put(a)
    key = objects.key_of(a)
    env.store.put_bytes(key, os.urandom(a.nbytes))  # same size, other bytes
    with pytest.raises(storage.StorageError, match=f"{key}.*corrupt"):
        digest.remote(ref).result(timeout=60)
    assert key.split("/")[1] not in env.cached()  # never cached


def test_small_objects_do_not_touch_the_store(env):
    before, cached = env.objects(), env.cached()
    small = np.arange(MB // 8, dtype=np.float64)  # 1 MiB: under the 8 MiB threshold
    assert digest.remote(small).result(timeout=60) == (h(small), small.shape, small.dtype.str)
    assert digest.remote(fabric.put(small)).result(timeout=60)[0] == h(small)
    assert make.remote(1, 1000).result(timeout=60).shape == (1000,)
    assert env.objects() <= before  # nothing added (earlier tests' dropped puts may have gone)
    assert env.cached() == cached


# --- pieces, without a cluster ------------------------------------------------------------
def test_transfer_modes(monkeypatch):
    monkeypatch.delenv("FABRIC_STORE", raising=False)
    storage.set_default(None)
    remote, local = "tcp://10.1.2.3:5555", "ipc:///tmp/x.sock"
    monkeypatch.setenv("FABRIC_TRANSFER", "auto")
    assert not serde.Transfer(remote).wanted()  # no store configured: keep the broker path
    monkeypatch.setenv("FABRIC_STORE", "file:///tmp/somewhere")
    assert serde.Transfer(remote).wanted() and not serde.Transfer(local).wanted()
    assert serde.Transfer(local).wanted(asked=True)  # a worker whose driver asked for it
    assert serde.Transfer(remote).result_opts() == protocol.STORE_RESULT
    assert serde.Transfer("tcp://127.0.0.1:5555").result_opts() == 0
    monkeypatch.setenv("FABRIC_TRANSFER", "broker")
    assert not serde.Transfer(remote).wanted(asked=True)
    monkeypatch.setenv("FABRIC_TRANSFER", "store")
    assert serde.Transfer(local).wanted()
    monkeypatch.setenv("FABRIC_TRANSFER", "sideways")
    with pytest.raises(ValueError, match="FABRIC_TRANSFER"):
        serde.Transfer(remote)
    assert serde.Transfer(remote, strict=False).threshold == serde.STORE_THRESHOLD  # workers go on
    monkeypatch.setenv("FABRIC_TRANSFER", "store")
    monkeypatch.setenv("FABRIC_STORE_THRESHOLD", "1MiB")
    assert serde.Transfer(remote).threshold == MB


def test_a_store_given_in_code_reaches_transfer_through_its_hook(tmp_path, monkeypatch):
    """Without FABRIC_STORE, a store counts once ``fabric.init(store=...)`` installed the hook,
    and for as long as the hook's store is set."""
    monkeypatch.delenv("FABRIC_STORE", raising=False)
    monkeypatch.setenv("FABRIC_TRANSFER", "auto")
    monkeypatch.setattr(transfer, "_given", None)  # the hook as a fresh process has it, put back after
    storage.set_default(None)
    remote = "tcp://10.1.2.3:5555"
    fabric.shutdown()
    try:
        assert not serde.Transfer(remote).wanted()
        fabric.init(num_cpus=1, store=str(tmp_path / "given"))
        assert transfer.store_configured() and serde.Transfer(remote).wanted()
        assert not serde.Transfer("ipc:///tmp/x.sock").wanted()  # one host: shared memory instead
        storage.set_default(None)
        assert not transfer.store_configured()  # the hook asks each time
    finally:
        fabric.shutdown()
        storage.set_default(None)


def test_spill_round_trip_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRIC_CACHE_DIR", str(tmp_path / "cache"))
    store = Store(tmp_path / "store")
    value = {"big": np.arange(3 * MB // 8, dtype=np.int64), "small": np.ones(10), "text": "x" * (2 * MB)}
    payload, bufs = serde.dumps_value(value)
    small_payload, small_bufs = serde.spill(payload, bufs, MB, store=store)
    assert len(small_payload) < 4096 and sum(b.nbytes for b in small_bufs) < 4096
    assert len(store.ls("objects")) == 2  # the array; the payload with the string
    monkeypatch.setenv("FABRIC_STORE", store.url())
    back = serde.loads_value(small_payload, small_bufs)
    assert np.array_equal(back["big"], value["big"]) and back["text"] == value["text"]
    assert np.array_equal(back["small"], value["small"])
    serde.spill(payload, bufs, MB, store=store)  # the same objects again: nothing new
    assert len(store.ls("objects")) == 2


def test_fetch_once_under_concurrency_and_trim(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("FABRIC_CACHE_DIR", str(tmp_path / "cache"))
    store = Store(tmp_path / "store")
    refs = [objects.upload(store, os.urandom(2 * MB)) for _ in range(3)]
    downloads = tmp_path / "downloads"
    real = Store.get_file

    def counted(self, key, path):  # runs in the forked processes: count through a file
        with open(downloads, "a") as f:
            f.write(key + "\n")
        time.sleep(0.2)  # a slow download, so the others come while it runs
        return real(self, key, path)

    monkeypatch.setattr(Store, "get_file", counted)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        got = pool.map(_fetch_len, [(refs[0], store.url())] * 8)
    assert got == [2 * MB] * 8
    assert downloads.read_text().split() == [refs[0][0]]  # 4 processes, one download
    monkeypatch.setenv("FABRIC_CACHE_BYTES", str(5 * MB))
    objects.fetch(refs[1], store)
    time.sleep(0.05)
    objects.fetch(refs[0], store)  # refs[0] is now the most recently used; refs[1] the least
    time.sleep(0.05)
    objects.fetch(refs[2], store)  # 6 MiB > 5 MiB: the least recently used goes
    names = {n for n in os.listdir(tmp_path / "cache") if not n.startswith(".") and not n.endswith(".lock")}
    assert names == {refs[0][0].split("/")[1], refs[2][0].split("/")[1]}


def _fetch_len(arg):
    ref, url = arg
    return len(objects.fetch(ref, Store(url)))


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("FABRIC_CACHE_DIR", str(tmp_path / "c"))
    assert objects.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("FABRIC_CACHE_DIR")
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))  # per-host homes: per-host caches
    assert objects.cache_dir() == str(tmp_path / "home" / "cache" / "objects")
    monkeypatch.delenv("FABRIC_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert objects.cache_dir() == str(tmp_path / "xdg" / "fabric" / "objects")


PUT_SPILL_SCRIPT = r"""
import gc, glob, os, time
import numpy as np
import fabric
fabric.init(num_cpus=1)                       # an embedded cluster: one host, no transfer by store
store = os.environ["STORE_DIR"]
objs = lambda: sorted(glob.glob(os.path.join(store, "objects", "**", "*"), recursive=True))

@fabric.fn
def total(a):
    return float(a.sum())

a = np.ones(1 << 19)                          # 4 MiB: above FABRIC_PUT_SPILL=1MiB
small = fabric.put(np.ones(10))
r1, r2 = fabric.put(a), fabric.put(a.copy())  # the same content twice: one object
print("OBJECTS", len([p for p in objs() if os.path.isfile(p)]))
print("SUMS", total.remote(r1).result(timeout=60), total.remote(r2).result(timeout=60),
      total.remote(small).result(timeout=60))
print("HELD", fabric.cluster_status()["results_held"])
del r1; gc.collect()
time.sleep(1.0)
print("AFTER_ONE", len([p for p in objs() if os.path.isfile(p)]))
del r2; gc.collect()
deadline = time.time() + 60  # (waits for the deletion; generous: a loaded host is slow, not wrong)
while [p for p in objs() if os.path.isfile(p)] and time.time() < deadline:
    time.sleep(0.1)
print("AFTER_BOTH", len([p for p in objs() if os.path.isfile(p)]))
"""


def test_big_puts_spill_to_the_store_on_one_host_and_are_deleted_when_dropped(tmp_path):
    """fabric.put of an object above FABRIC_PUT_SPILL goes to the store even on a local cluster
    (the broker's memory holds only a reference); the store's copy goes when the last put()
    Future holding that content is dropped."""
    from conftest import run_script

    store = tmp_path / "store"
    r = run_script(PUT_SPILL_SCRIPT, env={"FABRIC_PUT_SPILL": str(1 << 20), "FABRIC_STORE": f"file://{store}",
                                          "STORE_DIR": str(store), "FABRIC_CACHE_DIR": str(tmp_path / "cache")},
                   timeout=120)
    out = r.stdout
    assert "SUMS 524288.0 524288.0 10.0" in out, (out, r.stderr)
    assert "OBJECTS 1" in out and "AFTER_ONE 1" in out and "AFTER_BOTH 0" in out, (out, r.stderr)
