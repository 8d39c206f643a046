"""fabric.ml Dataset on the embedded cluster: real broker, executor and workers; S3 through a
moto server over HTTP (the session's, tests/conftest.py)."""
import gc
import os
import subprocess
import sys
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fabric
from fabric import ml
from fabric.ml import _blocks
from conftest import run_script, wait_for

pytestmark = pytest.mark.usefixtures("cluster")


def _submitted():
    return fabric.cluster_status()["stats"]["submitted"]


def _own_block_files():
    d = _blocks.block_dir()
    return {n for n in os.listdir(d) if n.startswith(f"{os.getpid()}-")}


def test_import_is_light():
    code = ("import sys, fabric.ml\n"
            "from fabric.ml import data, preprocessing\n"
            "heavy = [m for m in ('pandas', 'pyarrow', 'torch', 'tensorflow', 'xgboost') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sources_and_basic_queries():
    df = pd.DataFrame({"a": np.arange(10), "b": [f"s{i}" for i in range(10)]})
    for ds in (ml.from_pandas(df, override_num_blocks=3), ml.from_arrow(pa.Table.from_pandas(df)),
               ml.from_items(df.to_dict("records"), override_num_blocks=2)):
        assert ds.count() == 10
        assert ds.columns() == ["a", "b"]
        assert ds.take(2) == [{"a": 0, "b": "s0"}, {"a": 1, "b": "s1"}]
        pd.testing.assert_frame_equal(ds.to_pandas(), df)
    r = ml.range(1000, override_num_blocks=7)
    assert r.num_blocks() == 7 and r.count() == 1000
    assert r.to_arrow()["id"].to_pylist() == list(range(1000))
    n = ml.from_numpy(np.arange(12, dtype=np.float32).reshape(6, 2))
    b = n.take_batch(6)
    assert b["data"].shape == (6, 2) and b["data"][5].tolist() == [10.0, 11.0]
    assert ml.from_numpy({"x": np.arange(5)}).count() == 5
    assert ml.from_items([1, 2, 3]).take(3) == [{"item": 1}, {"item": 2}, {"item": 3}]


def test_in_memory_data_sent_by_calls_and_datasets_pickle(monkeypatch):
    import cloudpickle
    from fabric.ml import data
    df = pd.DataFrame({"a": np.arange(40), "b": np.arange(40) * 0.5})
    written_here = ml.from_pandas(df, override_num_blocks=2)
    monkeypatch.setattr(data, "_workers_here", lambda: False)   # as from a driver on another host
    sent = ml.from_pandas(df, override_num_blocks=2)
    assert all(isinstance(b[0][0], fabric.Future) for b in sent._blocks)
    for ds in (written_here, sent):
        pd.testing.assert_frame_equal(ds.to_pandas(), df)
        again = cloudpickle.loads(cloudpickle.dumps(ds.map_batches(lambda d: d.assign(c=d["a"] + 1))))
        assert again.to_pandas()["c"].tolist() == list(range(1, 41))


@pytest.mark.parametrize("fmt", ["pandas", "numpy", "pyarrow"])
def test_map_batches_formats(fmt):
    def double(batch, k):
        if fmt == "pandas":
            assert isinstance(batch, pd.DataFrame)
            return batch.assign(y=batch["id"] * k)
        if fmt == "numpy":
            assert isinstance(batch, dict) and isinstance(batch["id"], np.ndarray)
            return {"id": batch["id"], "y": batch["id"] * k}
        assert isinstance(batch, pa.Table)
        return batch.append_column("y", pa.compute.multiply(batch["id"], k))

    ds = ml.range(100, override_num_blocks=4).map_batches(double, batch_format=fmt, fn_kwargs={"k": 3})
    t = ds.to_arrow()
    assert t["y"].to_pylist() == [3 * i for i in range(100)]


def test_batches_are_writable_copies_unless_zero_copy():
    def edit(df):
        df.loc[0, "id"] = -1          # in place, as users do
        return df

    ds = ml.range(10, override_num_blocks=2).materialize()
    assert ds.map_batches(edit).to_arrow()["id"].to_pylist()[:6] == [-1, 1, 2, 3, 4, -1]
    assert ds.map_batches(lambda b: (b["id"].__iadd__(1), b)[1], batch_format="numpy").take(1) == [{"id": 1}]
    assert ds.take(1) == [{"id": 0}]                    # the input blocks did not change
    with pytest.raises(ValueError, match="read-only"):
        ds.map_batches(edit, zero_copy_batch=True).count()
    shared = ds.map_batches(lambda df: df.assign(s=df["id"] * 2), zero_copy_batch=True).materialize()
    assert all(b[0][0].result().base is not None for b in shared._blocks)
    assert shared.to_arrow()["s"].to_pylist() == [2 * i for i in range(10)]


def test_batch_size_splits_blocks():
    def sizes(b):
        return {"n": np.full(len(b["id"]), len(b["id"]))}

    out = ml.range(100, override_num_blocks=2).map_batches(sizes, batch_size=16, batch_format="numpy").to_arrow()
    # each block of 50 rows is seen in batches of 16, 16, 16 and 2
    assert sorted(set(out["n"].to_pylist())) == [2, 16]
    assert out.num_rows == 100


def test_chain_of_operations_is_one_call_per_block():
    ds = ml.range(200, override_num_blocks=5)
    chain = (ds.map_batches(lambda b: {"id": b["id"], "x": b["id"] * 2.0}, batch_format="numpy")
               .map_batches(lambda df: df.assign(z=df["x"] + 1), batch_format="pandas")
               .filter(lambda r: r["id"] % 2 == 0)
               .map(lambda r: {**r, "w": r["z"] * 10})
               .drop_columns(["x"])
               .select_columns(["id", "w"]))
    before = _submitted()
    t = chain.materialize().to_arrow()
    assert _submitted() - before == 5   # five blocks: the read and six operations ran in one call each
    assert t.column_names == ["id", "w"]
    assert t["w"].to_pylist() == [(2.0 * i + 1) * 10 for i in range(0, 200, 2)]


class Tagger:
    inits = 0   # per worker process: how many times __init__ ran there

    def __init__(self, offset):
        Tagger.inits += 1
        self.token = uuid.uuid4().hex
        self.offset = offset
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        n = len(batch)
        return batch.assign(token=[self.token] * n, inits=[Tagger.inits] * n, calls=[self.calls] * n,
                            id2=batch["id"] + self.offset)


def test_class_runs_in_warm_instances_init_once():
    ds = ml.range(120, override_num_blocks=8).map_batches(
        Tagger, concurrency=2, fn_constructor_kwargs={"offset": 1000}, batch_format="pandas")
    df = ds.to_pandas()
    assert df["id2"].tolist() == [i + 1000 for i in range(120)]
    tokens = set(df["token"])
    assert 1 <= len(tokens) <= 2           # at most concurrency instances
    assert set(df["inits"]) == {1}         # __init__ ran once in each instance's process
    per_token = df.groupby("token")["calls"].max()
    assert per_token.sum() == 8            # 8 blocks, each one call to a warm instance


def test_class_needs_call_and_function_refuses_constructor_kwargs():
    class NoCall:
        pass

    with pytest.raises(TypeError, match="__call__"):
        ml.range(4).map_batches(NoCall)
    with pytest.raises(TypeError, match="fn_constructor"):
        ml.range(4).map_batches(lambda b: b, fn_constructor_kwargs={"a": 1})


def test_limit_split_train_test_split_repartition():
    ds = ml.range(103, override_num_blocks=5)
    assert ds.limit(12).to_arrow()["id"].to_pylist() == list(range(12))
    lazy = ds.map_batches(lambda b: b, batch_format="pyarrow")
    assert lazy.limit(30).count() == 30
    shards = ds.split(4)
    assert [s.count() for s in shards] == [25] * 4
    seen = [x for s in shards for x in s.to_arrow()["id"].to_pylist()]
    assert len(set(seen)) == 100
    uneven = ds.split(4, equal=False)
    assert sum(s.count() for s in uneven) == 103 and max(s.count() for s in uneven) - min(
        s.count() for s in uneven) <= 1
    train, test = ds.train_test_split(test_size=0.2, shuffle=False)
    assert (train.count(), test.count()) == (83, 20)
    assert test.to_arrow()["id"].to_pylist() == list(range(83, 103))
    train, test = ds.train_test_split(test_size=10, seed=3)
    assert test.count() == 10
    assert sorted(train.to_arrow()["id"].to_pylist() + test.to_arrow()["id"].to_pylist()) == list(range(103))
    r = ds.repartition(3)
    assert r.num_blocks() == 3 and r.to_arrow()["id"].to_pylist() == list(range(103))


def test_random_shuffle():
    ds = ml.range(500, override_num_blocks=4)
    a = ds.random_shuffle(seed=7).to_arrow()["id"].to_pylist()
    b = ds.random_shuffle(seed=7).to_arrow()["id"].to_pylist()
    c = ds.random_shuffle(seed=8).to_arrow()["id"].to_pylist()
    assert sorted(a) == list(range(500))
    assert a == b and a != c and a != list(range(500))


def test_iter_batches():
    ds = ml.range(100, override_num_blocks=3).map_batches(lambda b: b, batch_format="pyarrow")
    sizes = [len(b["id"]) for b in ds.iter_batches(batch_size=32)]
    assert sizes == [32, 32, 32, 4]
    assert [len(b["id"]) for b in ds.iter_batches(batch_size=32, drop_last=True)] == [32, 32, 32]
    rows = [x for b in ds.iter_batches(batch_size=10, local_shuffle_buffer_size=40, local_shuffle_seed=1)
            for x in b["id"].tolist()]
    assert sorted(rows) == list(range(100)) and rows != list(range(100))
    frames = list(ds.iter_batches(batch_size=50, batch_format="pandas"))
    assert all(isinstance(f, pd.DataFrame) for f in frames)


def test_iter_torch_batches():
    torch = pytest.importorskip("torch")
    ds = ml.from_numpy({"x": np.arange(20, dtype=np.float64), "y": np.arange(20)})
    batches = list(ds.iter_torch_batches(batch_size=8, dtypes={"x": torch.float32}))
    assert [len(b["x"]) for b in batches] == [8, 8, 4]
    assert batches[0]["x"].dtype == torch.float32 and batches[0]["y"].dtype == torch.int64


def test_to_tf():
    tf = pytest.importorskip("tensorflow")
    ds = ml.from_numpy({"a": np.arange(10, dtype=np.float32), "b": np.ones(10, np.float32), "y": np.arange(10)})
    tfds = ds.to_tf(["a", "b"], "y", batch_size=4)
    got = list(tfds.as_numpy_iterator())
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert got[0][0]["a"].tolist() == [0, 1, 2, 3] and isinstance(tf.data.Dataset, type)


def test_parquet_and_csv_round_trip(tmp_path):
    df = pd.DataFrame({"x": np.arange(30, dtype=np.float32), "y": np.arange(30) % 3})
    out = tmp_path / "out"
    assert ml.from_pandas(df, override_num_blocks=3).write_parquet(str(out)) == 30
    files = sorted(os.listdir(out))
    assert len(files) == 3 and all(f.endswith(".parquet") for f in files)
    assert all(os.stat(out / f).st_mode & 0o077 == 0 for f in files)   # owner-only
    back = ml.read_parquet(str(out))
    assert back.num_blocks() == 3
    pd.testing.assert_frame_equal(back.to_pandas(), df)
    assert ml.read_parquet(str(out / "*.parquet"), columns=["y"]).columns() == ["y"]
    assert ml.read_parquet([str(out / files[0]), str(out / files[1])]).count() == 20
    big = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"i": np.arange(100)}), big, row_group_size=10)   # 10 row groups
    split = ml.read_parquet(str(big), override_num_blocks=4)
    assert split.num_blocks() == 4 and split.to_arrow()["i"].to_pylist() == list(range(100))
    csv = tmp_path / "d.csv"
    df.to_csv(csv, index=False)
    assert ml.read_csv(str(csv)).to_pandas()["y"].tolist() == df["y"].tolist()
    assert ml.read_csv(f"file://{csv}").count() == 30


def test_materialized_blocks_are_freed():
    gc.collect()
    before = _own_block_files()
    ds = ml.range(100, override_num_blocks=4).map_batches(lambda b: b, batch_format="pyarrow").materialize()
    made = _own_block_files() - before
    assert len(made) == 4
    shard = ds.split(2)[0]
    del ds
    gc.collect()
    assert len(_own_block_files() - before) == 4   # the shard still refers to them
    assert shard.count() == 50
    del shard
    gc.collect()
    assert wait_for(lambda: not (_own_block_files() & made))   # unlinked in the background


def test_unchanged_columns_are_shared_not_copied():
    base = ml.from_numpy({f"c{i}": np.arange(1000, dtype=np.float32) + i for i in range(5)},
                         override_num_blocks=2).map_batches(lambda t: t, batch_format="pyarrow").materialize()
    plus = base.map_batches(lambda df: df.assign(s=df.sum(axis=1)), batch_format="pandas",
                            zero_copy_batch=True).materialize()
    refs = [b[0][0].result() for b in plus._blocks]
    assert all(r.base is not None for r in refs)
    assert sum(r.nbytes for r in refs) < 5 * 1000 * 4 / 3      # only the new column was written
    del base
    gc.collect()
    df = plus.to_pandas()                                # the shared columns are still there
    assert list(df.columns) == ["c0", "c1", "c2", "c3", "c4", "s"]
    assert df["s"].tolist() == [5 * i + 10 for i in range(1000)]
    assert plus.select_columns(["s", "c4"]).materialize().take(1) == [{"s": 10.0, "c4": 4.0}]


STORE_MODE = """
import gc, os, time
import fabric
from fabric import ml, storage
fabric.init(num_cpus=2)
ds = ml.range(300, override_num_blocks=3).map_batches(lambda b: {"id": b["id"], "x": b["id"] * 2},
                                                     batch_format="numpy").materialize()
keys = storage.default().ls("ml-blocks")
shm = [n for n in os.listdir("/dev/shm/fabric-ml-%d" % os.getuid()) if n.startswith("%d-" % os.getpid())]
assert ds.map_batches(lambda df: df.assign(y=df["x"] + 1)).to_pandas()["y"].tolist() == [2 * i + 1 for i in range(300)]
del ds
gc.collect()
deadline = time.monotonic() + 10
while storage.default().ls("ml-blocks") and time.monotonic() < deadline:
    time.sleep(0.05)
print(len(keys), len(shm), len(storage.default().ls("ml-blocks")))
"""


def test_blocks_in_the_store_for_clusters_across_hosts(tmp_path):
    out = run_script(STORE_MODE, env={"FABRIC_ML_BLOCKS": "store", "FABRIC_STORE": f"file://{tmp_path}/store"},
                     timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["3", "0", "0"]   # 3 blocks in the store, none in shared memory, all freed


@fabric.fn
def _count_remote(ds):
    return ds.count(), ds.map_batches(lambda b: {"x": b["id"] + 1}, batch_format="numpy").to_arrow()["x"][0].as_py()


def test_dataset_travels_into_a_call():
    ds = ml.range(40, override_num_blocks=2).materialize()
    assert _count_remote.remote(ds).result(timeout=60) == (40, 1)


def _member(shards):
    ctx = fabric.gang_context()
    mine = shards[ctx.rank]
    rows = [int(x) for b in mine.iter_batches(batch_size=7) for x in b["y"]]
    return ctx.rank, mine.count(), rows, mine.map_batches(lambda b: {"y": b["y"] * 0}, batch_format="numpy").count()


def test_shards_in_a_gang_that_holds_every_cpu():
    # 2 members x 1 CPU take the whole 2-CPU cluster: the shards' pending steps run in the
    # members themselves (a nested call would wait for a CPU forever)
    ds = ml.range(60, override_num_blocks=4).map_batches(lambda b: {"y": b["id"] * 2}, batch_format="numpy")
    shards = ds.split(2)
    out = fabric.get(fabric.gang(2, cpus=1).run(_member, shards), timeout=120)
    out.sort()
    assert [o[1] for o in out] == [30, 30] and [o[3] for o in out] == [30, 30]
    assert sorted(out[0][2] + out[1][2]) == [2 * i for i in range(60)]


def test_progress_bar_is_quiet_off_a_terminal(capfd):
    from fabric.ml import data
    assert data._Bar("materialize", 100).p is None          # stderr is not a TTY under pytest
    ml.range(100, override_num_blocks=10).map_batches(lambda t: t, batch_format="pyarrow").materialize()
    assert "materialize" not in capfd.readouterr().err


# --- bad input: clear errors, and the cluster keeps serving -----------------------------------
def test_errors_are_clear_and_cluster_keeps_serving(tmp_path):
    ds = ml.from_pandas(pd.DataFrame({"a": [1, 2], "b": [3, 4]}))
    with pytest.raises(ValueError, match=r"no column\(s\) 'zz'.*'a', 'b'"):
        ds.select_columns(["zz"])
    lazy = ds.map_batches(lambda df: df, batch_format="pandas")
    with pytest.raises(ValueError, match=r"no column\(s\) 'q'.*'a', 'b'"):
        lazy.drop_columns("q").count()
    with pytest.raises(TypeError, match="must return a pandas.DataFrame.*returned builtins.int"):
        ds.map_batches(lambda df: 42).materialize()
    with pytest.raises(TypeError, match=r"map\(.*must return a dict"):
        ds.map(lambda r: [r]).count()
    with pytest.raises(ValueError, match="batch_format must be one of"):
        ds.map_batches(lambda b: b, batch_format="polars")
    with pytest.raises(ValueError, match="batch_format must be one of"):
        next(ds.iter_batches(batch_format="arrow"))
    with pytest.raises(ValueError, match="batch_size"):
        ds.map_batches(lambda b: b, batch_size=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ds.train_test_split(test_size=1.5)
    with pytest.raises(ValueError, match="between 1 and 1"):
        ds.train_test_split(test_size=5)
    with pytest.raises(TypeError, match="test_size"):
        ds.train_test_split(test_size="half")
    with pytest.raises(ValueError, match="limit"):
        ds.limit(-1)
    with pytest.raises(ValueError, match="split"):
        ds.split(0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ml.read_parquet(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        ml.read_parquet(str(tmp_path / "empty"))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "one.parquet")
    with pytest.raises(ValueError, match=r"no column\(s\) 'b'.*'a'"):
        ml.read_parquet(str(tmp_path / "one.parquet"), columns=["b"]).count()

    def boom(df):
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        ds.map_batches(boom).count()
    # the cluster still serves
    assert ds.map_batches(lambda df: df.assign(c=df["a"] + df["b"])).to_pandas()["c"].tolist() == [4, 6]


# --- S3: the session's moto server over HTTP (tests/conftest.py) -----------------------------
@pytest.fixture(scope="module")
def s3(moto_server):
    pytest.importorskip("s3fs")
    endpoint = moto_server
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}
    import boto3
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="ml-bucket")
    return opts


def test_s3_parquet_with_storage_options(s3):
    df = pd.DataFrame({"x": np.arange(50, dtype=np.float64), "y": np.arange(50) % 2})
    url = f"s3://ml-bucket/{uuid.uuid4().hex}/train"
    assert ml.from_pandas(df, override_num_blocks=2).write_parquet(url, storage_options=s3) == 50
    back = ml.read_parquet(url, storage_options=s3)
    assert back.num_blocks() == 2
    pd.testing.assert_frame_equal(back.to_pandas(), df)


def test_s3_through_the_default_store(s3):
    from fabric import storage
    old = storage._default
    storage.set_default(f"s3://ml-bucket/store-{uuid.uuid4().hex}", **s3)
    try:
        url = f"s3://ml-bucket/{uuid.uuid4().hex}/d"
        ml.range(20, override_num_blocks=2).write_parquet(url)   # credentials from the store
        assert ml.read_parquet(url).map_batches(lambda b: {"id": b["id"] * 2}, batch_format="numpy").to_arrow()[
            "id"].to_pylist() == [2 * i for i in range(20)]
    finally:
        storage._default = old
