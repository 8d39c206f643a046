"""@fabric.fn(cache=True): flow stages whose results are kept in the store by code and argument hashes."""
import os
import subprocess
import sys
import threading

import pytest

import fabric
from fabric import storage

from conftest import REPO

STAGE = '''
import sys, fabric
marker = sys.argv[1]

@fabric.fn(cache=True)
def stage(x, scale=1):
    with open(marker, "a") as f:
        f.write("ran\\n")
    return x * BODY + scale

@fabric.fn
def produce(v):
    return v

print("RESULT", stage.remote(2).result(), stage.remote(produce.remote(2)).result(), stage.remote(3, scale=5).result())
'''


def _run(tmp_path, body="10"):
    script = tmp_path / "flow.py"
    script.write_text(STAGE.replace("BODY", body))
    marker = tmp_path / "ran.txt"
    r = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=dict(os.environ, FABRIC_HOME=str(tmp_path / "home")))
    assert r.returncode == 0, r.stderr
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")][0]
    runs = marker.read_text().count("ran") if marker.exists() else 0
    marker.unlink(missing_ok=True)
    return result, runs


def test_a_rerun_skips_unchanged_stages_and_a_changed_body_is_a_miss(tmp_path):
    first, runs = _run(tmp_path)
    assert first == "RESULT 21 21 35"
    # stage(2) ran once: the call whose argument was a Future of 2 had the same key (computed on the cluster)
    assert runs == 2
    again, runs = _run(tmp_path)
    assert again == first and runs == 0  # a second run of the flow computes nothing
    changed, runs = _run(tmp_path, body="100")
    assert changed == "RESULT 201 201 305" and runs == 2  # a changed function body is a miss


def test_cache_cli_lists_and_clears(tmp_path):
    _run(tmp_path)
    env = dict(os.environ, FABRIC_HOME=str(tmp_path / "home"))
    ls = subprocess.run([sys.executable, "-m", "fabric.cli", "cache", "ls"], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=60)
    assert ls.returncode == 0 and len([k for k in ls.stdout.splitlines() if k.startswith("cache/stage-")]) == 2
    clear = subprocess.run([sys.executable, "-m", "fabric.cli", "cache", "clear", "stage"], capture_output=True,
                           text=True, env=env, cwd=REPO, timeout=60)
    assert "deleted 2" in clear.stdout
    _, runs = _run(tmp_path)
    assert runs == 2  # cleared: computed again


@fabric.fn(cache=True)
def cached_len(x):
    return len(x)


@fabric.fn
def plain(x):
    return x


def test_an_unhashable_argument_is_refused_clearly_and_the_cluster_keeps_serving(cluster):
    with pytest.raises(fabric.SerializationError, match="cannot be pickled"):
        cached_len.remote([threading.Lock()])
    assert cached_len.remote([1, 2, 3]).result(timeout=60) == 3
    assert plain.remote(7).result(timeout=60) == 7
    assert any(k.startswith("cache/cached_len-") for k in storage.default().ls("cache"))


def test_cache_must_be_a_bool():
    with pytest.raises(TypeError, match="cache must be True or False"):
        fabric.fn(cache="yes")(lambda: 1)
    with pytest.raises(TypeError, match="unknown option"):
        fabric.cls(cache=True)


@fabric.fn(cache=True)
def ckpt_stage(ckpt, marker):
    from fabric.ml import Checkpoint

    assert isinstance(ckpt, Checkpoint)
    with open(marker, "a") as f:
        f.write("ran\n")
    with ckpt.as_directory() as d:
        return open(os.path.join(d, "w.txt")).read()


def test_a_checkpoint_argument_is_keyed_by_its_files_so_a_rewrite_in_place_is_a_miss(cluster, tmp_path):
    from fabric.ml import Checkpoint

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "w.txt").write_text("one")
    marker = str(tmp_path / "ran.txt")
    ck = Checkpoint.from_directory(str(d))
    assert ckpt_stage.remote(ck, marker).result(timeout=60) == "one"
    assert ckpt_stage.remote(Checkpoint.from_directory(str(d)), marker).result(timeout=60) == "one"
    assert open(marker).read().count("ran") == 1  # same path, same files: a hit
    (d / "w.txt").write_text("two")  # rewritten in place: the same path, other content
    assert ckpt_stage.remote(ck, marker).result(timeout=60) == "two"
    assert open(marker).read().count("ran") == 2


@fabric.fn(cache=True)
def ds_total(ds, marker):
    with open(marker, "a") as f:
        f.write("ran\n")
    return float(ds.to_pandas()["x"].sum())


def test_a_dataset_argument_is_keyed_by_its_blocks_content_not_their_files(cluster, tmp_path):
    from fabric import ml

    marker = str(tmp_path / "ran.txt")
    a = ml.from_items([{"x": float(i)} for i in range(50)])
    b = ml.from_items([{"x": float(i)} for i in range(50)])  # equal rows, other block files
    c = ml.from_items([{"x": float(i) * 2} for i in range(50)])
    assert ds_total.remote(a, marker).result(timeout=120) == 1225.0
    assert ds_total.remote(b, marker).result(timeout=120) == 1225.0
    assert open(marker).read().count("ran") == 1  # b hit a's result
    assert ds_total.remote(c, marker).result(timeout=120) == 2450.0
    shifted = a.map_batches(lambda df: df.assign(x=df.x + 1))
    assert ds_total.remote(shifted, marker).result(timeout=120) == 1275.0
    assert open(marker).read().count("ran") == 3  # other content, another plan: misses
