"""fabric/runtime_env.py, the pure half of runtime environments: validation, the merge of the
job's env and a function's, hashing and the packaging of a working_dir. No cluster."""
import io
import os
import zipfile

import pytest

import fabric
from fabric import runtime_env as R


def test_validate_normalises():
    assert R.validate("w", None) == {}
    env = R.validate("w", {"env_vars": {"A": "1"}, "pip": ("pkg==1.2", " other "), "working_dir": "."})
    assert env == {"env_vars": {"A": "1"}, "pip": ["pkg==1.2", "other"], "working_dir": os.path.abspath(".")}
    assert R.validate("w", R.validate("w", env)) == env  # idempotent: .options() validates again


@pytest.mark.parametrize("env, exc, words", [
    ("pip", TypeError, "must be a dict"),
    ({"conda": "x"}, TypeError, "unknown key(s) conda"),
    ({"env_vars": ["A=1"]}, TypeError, "dict of str to str"),
    ({"env_vars": {"A": 1}}, TypeError, "['A'] must be a string"),
    ({"env_vars": {"A=B": "1"}}, ValueError, "invalid variable name"),
    ({"env_vars": {"": "1"}}, ValueError, "invalid variable name"),
    ({"pip": "pkg==1.2"}, TypeError, "a list of requirements"),
    ({"pip": ["ok", 3]}, ValueError, "holds 3"),
    ({"pip": [""]}, ValueError, "one requirement"),
    ({"working_dir": 5}, TypeError, "local folder's path"),
    ({"working_dir": "/nonexistent/runenv-x"}, ValueError, "does not exist"),
    ({"excludes": "*.bin"}, TypeError, "list of glob patterns"),
])
def test_validate_refuses_with_the_key_named(env, exc, words):
    with pytest.raises(exc) as e:
        R.validate("@fabric.fn", env)
    assert words in str(e.value) and "@fabric.fn" in str(e.value)


def test_validate_refuses_a_file_as_working_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        R.validate("w", {"working_dir": str(tmp_path / "f")})


def test_merge_env_vars_key_by_key_and_other_keys_replaced():
    job = {"env_vars": {"A": "1", "B": "2"}, "pip": ["x"], "working_dir": "/j"}
    fn = {"env_vars": {"B": "3"}, "pip": ["y"]}
    assert R.merge(job, fn) == {"env_vars": {"A": "1", "B": "3"}, "pip": ["y"], "working_dir": "/j"}
    assert R.merge(job, {"working_dir": None, "pip": None}) == {"env_vars": {"A": "1", "B": "2"}}
    assert R.merge(None, None) == {} and R.merge({}, {"env_vars": {}}) == {}
    assert R.merge(None, fn) == fn and job["env_vars"] == {"A": "1", "B": "2"}  # inputs untouched


def test_digests_are_stable_and_order_free_for_dicts():
    assert R.digest({"a": 1, "b": [1, 2]}) == R.digest({"b": [1, 2], "a": 1})
    assert R.pip_hash(["a", "b"]) != R.pip_hash(["b", "a"])  # pip resolves a list in its order
    assert R.pip_hash(["a"]) == R.pip_hash(["a"])


def _tree(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_package_is_deterministic_and_leaves_out_the_excluded(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = {"main.py": b"print(1)\n", "lib/__init__.py": b"X = 1\n", "data/big.bin": b"0" * 1000}
    junk = {".git/HEAD": b"ref", "lib/__pycache__/x.pyc": b"\0", "venv/pyvenv.cfg": b"home = /usr",
            "myenv/pyvenv.cfg": b"home", "myenv/lib/site.py": b"", "node_modules/m.js": b""}
    _tree(a, {**files, **junk})
    _tree(b, files)
    os.utime(b / "main.py", (1, 1))  # times do not count, contents do
    za, ha = R.package(str(a))
    zb, hb = R.package(str(b))
    assert ha == hb and za == zb
    assert sorted(zipfile.ZipFile(io.BytesIO(za)).namelist()) == ["data/big.bin", "lib/__init__.py", "main.py"]
    _, hx = R.package(str(a), excludes=["data/"])
    assert hx != ha and "data/big.bin" not in [r for r, _, _ in R.walk(str(a), ["data/"])]
    assert [r for r, _, _ in R.walk(str(a), ["*.bin"])] == ["lib/__init__.py", "main.py"]
    (b / "main.py").write_bytes(b"print(2)\n")
    assert R.package(str(b))[1] != hb


def test_package_keeps_file_modes(tmp_path):
    _tree(tmp_path, {"run.sh": b"#!/bin/sh\n"})
    os.chmod(tmp_path / "run.sh", 0o750)
    z = zipfile.ZipFile(io.BytesIO(R.package(str(tmp_path))[0]))
    assert (z.getinfo("run.sh").external_attr >> 16) & 0o777 == 0o750


def test_package_over_the_limit_names_the_largest_files(tmp_path):
    _tree(tmp_path, {"weights.bin": b"0" * 5000, "small.py": b"x"})
    with pytest.raises(fabric.RuntimeEnvError) as e:
        R.package(str(tmp_path), limit=4000)
    msg = str(e.value)
    assert "weights.bin" in msg and "limit" in msg and "excludes" in msg
    assert isinstance(e.value, ValueError)
    assert R.package(str(tmp_path), excludes=["*.bin"], limit=4000)[1]


def test_limit_follows_the_setting(monkeypatch):
    assert R.limit() == R.DEFAULT_LIMIT
    monkeypatch.setenv("FABRIC_WORKING_DIR_LIMIT", "1KiB")
    assert R.limit() == 1024


def test_env_call_pickles_without_its_worker_state():
    import pickle

    ec = R.EnvCall({"env_vars": {"A": "1"}}, b"code", "f", "f", "m", "function")
    ec.loaded, ec.failed = object(), RuntimeError("x")
    back = pickle.loads(pickle.dumps(ec))
    assert (back.env, back.code, back.__name__, back.kind) == (ec.env, b"code", "f", "function")
    assert back.loaded is None and back.failed is None


def test_decorators_and_options_validate(tmp_path):
    with pytest.raises(TypeError, match="unknown key"):
        fabric.fn(runtime_env={"conda": {}})(lambda: 1)
    with pytest.raises(ValueError, match="does not exist"):
        fabric.cls(runtime_env={"working_dir": str(tmp_path / "gone")})(type("C", (), {}))
    f = fabric.fn(runtime_env={"env_vars": {"A": "1"}})(lambda: 1)
    assert f._options["runtime_env"] == {"env_vars": {"A": "1"}}
    with pytest.raises(TypeError, match="must be a string"):
        f.options(runtime_env={"env_vars": {"A": 2}})
    assert f.options(cpus=2)._options["runtime_env"] == {"env_vars": {"A": "1"}}
    with pytest.raises(TypeError, match="fabric.init"):
        fabric.init(runtime_env=[1])
