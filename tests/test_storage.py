"""fabric.storage against real backends: local disk, memory://, and S3 through s3fs talking
HTTP to a moto server that these tests start (and stop)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import pytest

from fabric import storage
from fabric.storage import InvalidStoreURL, KeyNotFound, StorageCredentialsError, StorageError, Store

from fabric.errors import FabricError, SerializationError
from conftest import AWS_TEST_ENV, start_moto, stop_moto

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fabric-test"

try:
    import moto.server  # noqa: F401
    import s3fs  # noqa: F401

    S3_SKIP = None
except ImportError as e:  # pragma: no cover - the [test] extra installs both
    S3_SKIP = f"S3 tests need s3fs and moto[server] (pip install 'fabric-compute[test]'): {e}"


# --- a real S3 endpoint: moto's standalone server over HTTP (tests/conftest.py) ---------------
AWS_ENV = AWS_TEST_ENV


@pytest.fixture(scope="module")
def moto_endpoint(moto_server):
    if S3_SKIP:
        pytest.skip(S3_SKIP)
    endpoint = moto_server
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture
def aws_env(moto_endpoint, monkeypatch):
    """Function-scoped copy of the module's AWS env, so tests may change it safely."""
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    return moto_endpoint


def _s3_store(endpoint: str, **options) -> Store:
    return Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=endpoint, **options)


BACKENDS = ["file", "path", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> Store:
    kind = request.param
    if kind == "file":
        return Store(f"file://{tmp_path}/store")
    if kind == "path":
        return Store(str(tmp_path / "plain"))
    if kind == "memory":
        return Store(f"memory://t-{uuid.uuid4().hex}")
    return _s3_store(request.getfixturevalue("aws_env"))


@pytest.fixture(autouse=True)
def _no_default(monkeypatch):
    monkeypatch.delenv("FABRIC_STORE", raising=False)
    monkeypatch.delenv("FABRIC_STORE_OPTIONS", raising=False)
    storage.set_default(None)
    yield
    storage.set_default(None)


# --- the basic surface -------------------------------------------------------------------------
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return (self.x, self.y) == (other.x, other.y)


def test_objects_round_trip(store):
    store.put("a/b/obj", {"n": 1, "p": Point(1, 2), "s": "x" * 1000})
    assert store.get("a/b/obj") == {"n": 1, "p": Point(1, 2), "s": "x" * 1000}
    store.put("fn", lambda v: v + 1)  # cloudpickle fallback
    assert store.get("fn")(1) == 2
    store.put("a/b/obj", [3])  # overwrite
    assert store.get("a/b/obj") == [3]


def test_numpy_arrays(store):
    arr = np.random.default_rng(0).standard_normal((300, 70))
    store.put("arr", arr)
    out = store.get("arr")
    assert out.dtype == arr.dtype and np.array_equal(out, arr)


def test_bytes_raw_and_pickled(store):
    store.put_bytes("raw.bin", b"\x00hello")
    assert store.get_bytes("raw.bin") == b"\x00hello"
    store.put_bytes("view.bin", memoryview(bytearray(b"abc")))
    assert store.get_bytes("view.bin") == b"abc"
    # put() always pickles, bytes included; get_bytes shows the pickle, get gives bytes back.
    store.put("pickled", b"hello")
    assert store.get("pickled") == b"hello"
    assert store.get_bytes("pickled") == pickle.dumps(b"hello", protocol=5)
    with pytest.raises(FabricError, match="get_bytes"):
        store.get("raw.bin")


def test_exists_ls_delete(store):
    for k in ("x", "runs/1/m", "runs/1/n", "runs/2/m", "runsX"):
        store.put_bytes(k, b"1")
    assert store.exists("runs/1/m") and not store.exists("runs/3")
    assert store.ls() == ["runs/1/m", "runs/1/n", "runs/2/m", "runsX", "x"]
    assert store.ls("runs") == ["runs/1/m", "runs/1/n", "runs/2/m"]
    assert store.ls("runs/1") == ["runs/1/m", "runs/1/n"]
    assert store.ls("x") == ["x"]
    assert store.ls("nothing/here") == []
    store.delete("runs/1/m")
    assert not store.exists("runs/1/m")
    assert store.ls("runs") == ["runs/1/n", "runs/2/m"]


def test_open_streams_both_ways(store):
    with store.open("log.txt", "w") as f:
        f.write("line 1\n")
        f.write("line 2\n")
    with store.open("log.txt", "r") as f:
        assert f.read().splitlines() == ["line 1", "line 2"]
    with store.open("blob", "wb") as f:
        for i in range(10):
            f.write(bytes([i]) * 1000)
    with store.open("blob", "rb") as f:
        f.seek(5000)
        assert f.read(1) == b"\x05"
    with pytest.raises(ValueError, match="mode"):
        store.open("blob", "ab")


def test_failed_write_keeps_old_value(store):
    store.put_bytes("k", b"old")
    for mode, data in (("wb", b"new"), ("w", "new")):
        with pytest.raises(RuntimeError):
            with store.open("k", mode) as f:
                f.write(data)
                raise RuntimeError("writer died")
        assert store.get_bytes("k") == b"old"
    f = store.open("k", "wb")  # dropped without close: not published
    f.write(b"new")
    del f
    with pytest.raises(SerializationError, match="cannot pickle a lock for key 'k'"):  # leaves nothing behind either
        store.put("k", threading.Lock())
    assert store.get_bytes("k") == b"old"
    assert store.ls() == ["k"]


def test_unpicklable_is_serialization_error(store):
    with pytest.raises(FabricError, match="cannot pickle a lock"):
        store.put("l", threading.Lock())
    assert not store.exists("l")


def test_arrow_tables(store):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"id": list(range(1000)), "name": [f"n{i}" for i in range(1000)]})
    store.put_table("t/data.parquet", table)
    assert store.get_table("t/data.parquet").equals(table)
    assert store.get_table("t/data.parquet", columns=["name"]).column_names == ["name"]
    import pyarrow.parquet as pq  # it is plain Parquet, readable without fabric

    with store.open("t/data.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == 1000


def _make_ckpt(root: Path, tag: str) -> Path:
    (root / "weights").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "weights" / "w.bin").write_bytes(tag.encode() * 1000)
    (root / f"only-{tag}.json").write_text(tag)
    return root


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_directories(store, tmp_path):
    v1 = _make_ckpt(tmp_path / "v1", "one")
    store.put_dir("ckpt/run", v1)
    assert store.exists("ckpt/run")
    assert store.ls() == ["ckpt/run/"] and store.ls("ckpt") == ["ckpt/run/"]
    out = Path(store.get_dir("ckpt/run", tmp_path / "out1"))
    assert _tree(out) == _tree(v1)
    with pytest.raises(KeyNotFound, match="get_dir"):
        store.get("ckpt/run")

    v2 = _make_ckpt(tmp_path / "v2", "two")
    store.put_dir("ckpt/run", v2)  # replaces the whole directory: no file of v1 survives
    assert _tree(Path(store.get_dir("ckpt/run", tmp_path / "out2"))) == _tree(v2)
    internal = [p for p in store.fs.find(store._path("ckpt/run")) if "/.fabric-v" in p]
    assert len({p.split("/.fabric-v")[1].split("/")[0] for p in internal}) == 1  # old version gone

    store.delete("ckpt/run")
    assert not store.exists("ckpt/run") and store.ls() == []
    with pytest.raises(KeyNotFound):
        store.get_dir("ckpt/run", tmp_path / "out3")
    store.put_bytes("plain", b"x")
    with pytest.raises(KeyNotFound, match="single object"):
        store.get_dir("plain", tmp_path / "out4")
    with pytest.raises(NotADirectoryError):
        store.put_dir("x", tmp_path / "v1" / "only-one.json")


def test_missing_keys(store):
    for read in (store.get, store.get_bytes, store.get_table, lambda k: store.open(k, "rb"),
                 store.delete):
        with pytest.raises(KeyNotFound) as info:
            read("no/such/key")
        assert isinstance(info.value, KeyError) and isinstance(info.value, StorageError)
        assert isinstance(info.value, FabricError)
        assert "'no/such/key'" in str(info.value) and str(store).split("'")[1] in str(info.value)
        assert info.value.key == "no/such/key"
    store.delete("no/such/key", missing_ok=True)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a\\b", "a//b", "a/", "./a",
                                 ".fabric-dir", "a/.fabric-tmp-x"])
def test_bad_keys(key):
    store = Store("memory://bad-keys")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)


def test_url_and_pickling(tmp_path):
    store = Store(tmp_path)
    assert store.url() == f"file://{tmp_path}"
    assert store.url("a/b") == f"file://{tmp_path}/a/b"
    store.put("k", 42)
    clone = pickle.loads(pickle.dumps(store))  # stores travel to workers as arguments
    assert clone.get("k") == 42
    assert Store("memory://x").url("k") == "memory:///x/k"
    if not S3_SKIP:
        assert Store(f"s3://{BUCKET}/p").url("k") == f"s3://{BUCKET}/p/k"


# --- bad URLs and credentials ------------------------------------------------------------------
@pytest.mark.parametrize("url, match", [
    ("nosuchproto://bucket/x", "unknown protocol 'nosuchproto'"),
    ("", "non-empty"),
    ("s3://", "bucket"),
])
def test_bad_urls(url, match):
    with pytest.raises(InvalidStoreURL, match=match) as info:
        Store(url)
    assert isinstance(info.value, FabricError) and isinstance(info.value, ValueError)


def test_missing_backend_package_says_what_to_install():
    # A fresh interpreter where s3fs cannot be imported: the real fsspec import path fails.
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from fabric.storage import Store, InvalidStoreURL\n"
            "try:\n    Store('s3://bucket/prefix')\nexcept InvalidStoreURL as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "pip install 'fabric-compute[s3]'" in out.stdout, out.stderr


def test_secrets_stay_out_of_messages():
    store = Store("memory://user:hunter2@host/x?token=sekrit")
    with pytest.raises(KeyNotFound) as info:
        store.get("k")
    shown = "".join(traceback.format_exception(info.value))  # chained causes included
    for text in (repr(store), shown):
        assert "hunter2" not in text and "sekrit" not in text


def test_no_credentials(aws_env, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    # skip_instance_cache: fsspec would otherwise hand back a client that already holds keys.
    store = _s3_store(aws_env, skip_instance_cache=True)
    for op in (lambda: store.put_bytes("k", b"x"), lambda: store.get_bytes("k"), store.ls):
        with pytest.raises(StorageCredentialsError, match="AWS_ACCESS_KEY_ID") as info:
            op()
        assert isinstance(info.value, FabricError)


def test_rejected_credentials(moto_endpoint):
    # A second moto server with authentication on: unknown keys are refused with a 403.
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        store = Store(f"s3://{BUCKET}/p", endpoint_url=endpoint, key="AKIAUNKNOWN",
                      secret="very-secret-value", skip_instance_cache=True)
        for op in (lambda: store.put_bytes("k", b"x"), lambda: store.get("k"), store.ls):
            with pytest.raises(StorageCredentialsError) as info:
                op()
            assert "very-secret-value" not in str(info.value)
            assert "AWS_SECRET_ACCESS_KEY" in str(info.value)
    finally:
        stop_moto(proc)


def test_s3_endpoint_from_aws_env(aws_env, monkeypatch):
    # botocore reads AWS_ENDPOINT_URL itself: no storage option needed.
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env)
    store = Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", skip_instance_cache=True)
    store.put("k", [1, 2])
    assert store.get("k") == [1, 2]
    assert Store(store.url(), endpoint_url=aws_env).get("k") == [1, 2]  # it went to moto


# --- atomic writes -----------------------------------------------------------------------------
def _hammer(store: Store, seconds: float = 0.6) -> int:
    """Writers replace one key with uniform payloads of different sizes while readers check that
    every read is one whole payload. Returns the number of reads checked."""
    sizes = {b"a": 300_000, b"b": 700_000, b"c": 50_000}
    store.put_bytes("hot", b"a" * sizes[b"a"])
    stop = threading.Event()
    bad, reads = [], [0]

    def writer(tag):
        while not stop.is_set():
            with store.open("hot", "wb") as f:  # streamed in pieces: a torn write would show
                for i in range(0, sizes[tag], 10_000):
                    f.write(tag * min(10_000, sizes[tag] - i))

    def reader():
        while not stop.is_set():
            data = store.get_bytes("hot")
            reads[0] += 1
            if len(data) != sizes.get(data[:1], -1) or data.count(data[:1]) != len(data):
                bad.append(len(data))

    threads = [threading.Thread(target=writer, args=(t,)) for t in (b"b", b"c")]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    assert not bad, f"readers saw partial objects of sizes {bad[:5]}"
    return reads[0]


def test_concurrent_readers_never_see_partial_writes(store):
    assert _hammer(store) > 5
    assert store.ls() == ["hot"]  # no temporary names left behind or listed


WRITER = """
import sys, time, numpy as np
from fabric.storage import Store
store, stop_at, i = Store(sys.argv[1]), time.time() + float(sys.argv[2]), 0
while time.time() < stop_at:
    i += 1
    store.put("obj", np.full(200_000 + (i % 3) * 100_000, i % 251, dtype=np.uint8))
"""


def test_atomic_across_processes(tmp_path):
    root = tmp_path / "s"
    store = Store(root)
    store.put("obj", np.zeros(200_000, dtype=np.uint8))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "1.0"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = set()
    while proc.poll() is None:
        arr = store.get("obj")  # a torn file would fail to unpickle or be non-uniform
        assert arr.size in (200_000, 300_000, 400_000) and (arr == arr[0]).all()
        seen.add(int(arr[0]))
    assert proc.wait() == 0 and len(seen) > 1
    assert sorted(os.listdir(root)) == ["obj"]


def test_directory_readers_see_whole_checkpoints(store, tmp_path):
    """get_dir during repeated put_dir always yields one consistent version."""
    srcs = []
    for tag in ("a", "b"):
        d = tmp_path / f"src-{tag}"
        for i in range(4):
            (d / f"part{i}").parent.mkdir(parents=True, exist_ok=True)
            (d / f"part{i}").write_bytes(tag.encode() * 20_000)
        srcs.append(d)
    store.put_dir("ck", srcs[0])
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            store.put_dir("ck", srcs[i % 2])
            time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for n in range(8):
            out = Path(store.get_dir("ck", tmp_path / f"out{n}"))
            contents = {p.read_bytes()[:1] for p in out.iterdir()}
            assert len(contents) == 1 and len(list(out.iterdir())) == 4
    finally:
        stop.set()
        t.join()


# --- the default store -------------------------------------------------------------------------
def test_default_falls_back_to_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "fh"))  # fabric's data folder holds the store
    assert storage.default().url() == f"file://{tmp_path}/fh/store"
    monkeypatch.delenv("FABRIC_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert storage.default().url() == f"file://{tmp_path}/xdg/fabric/store"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store = storage.default()
    assert store.url() == f"file://{tmp_path}/home/.local/share/fabric/store"
    store.put("k", 1)  # the folder is created on first write
    assert (tmp_path / "home/.local/share/fabric/store/k").is_file()


def test_default_order(tmp_path, monkeypatch):
    monkeypatch.delenv("FABRIC_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    storage.set_default(f"file://{tmp_path}/chosen")
    assert storage.default().url() == f"file://{tmp_path}/chosen"
    monkeypatch.setenv("FABRIC_STORE", f"file://{tmp_path}/from-env")  # the env var wins
    assert storage.default().url() == f"file://{tmp_path}/from-env"
    monkeypatch.delenv("FABRIC_STORE")
    storage.set_default(None)
    assert storage.default().url() == f"file://{tmp_path}/xdg/fabric/store"
    with pytest.raises(InvalidStoreURL):  # a bad URL fails when it is set, not when first used
        storage.set_default("nosuchproto://x")


def test_default_from_env_with_options(aws_env, monkeypatch):
    prefix = uuid.uuid4().hex
    monkeypatch.setenv("FABRIC_STORE", f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv("FABRIC_STORE_OPTIONS", f'{{"endpoint_url": "{aws_env}"}}')
    storage.default().put("k", {"v": 1})
    assert Store(f"s3://{BUCKET}/{prefix}", endpoint_url=aws_env).get("k") == {"v": 1}
    monkeypatch.setenv("FABRIC_STORE_OPTIONS", '{"secret": "leaky"')
    with pytest.raises(InvalidStoreURL, match="FABRIC_STORE_OPTIONS") as info:
        storage.default()
    assert "leaky" not in str(info.value)
