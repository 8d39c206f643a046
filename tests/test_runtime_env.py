"""runtime_env on real clusters: env_vars, working_dir and pip applied around a call in reused
workers and gone after it, the job's env under a function's, classes, errors; on an embedded
cluster and on one `fabric start` made. No network: pip installs a package built here."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fabric
from conftest import free_port, run_script, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]
# pip offline: no index, and the local package builds with the setuptools already installed
pytestmark = pytest.mark.timeout(600)  # pip builds a package on a shared machine
PIP_OFFLINE = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}


def make_package(root, name="tinypkg", version="1.2"):
    """A tiny installable package (pyproject.toml + one module): its folder."""
    d = root / f"{name}-{version}"
    (d / name).mkdir(parents=True)
    (d / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "{version}"
        """))
    (d / name / "__init__.py").write_text(f"VERSION = {version!r}\n")
    return str(d)


def make_working_dir(root, value):
    d = root / f"wd-{value}"
    (d / "rtmod").mkdir(parents=True)
    (d / "rtmod" / "__init__.py").write_text(f"VALUE = {value!r}\n")
    (d / "data.txt").write_text(f"data {value}\n")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: x\n")
    return str(d)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    """A 1-CPU cluster (one pool worker, so calls share it) whose executors cache envs in a
    folder of this module; the driver connects by address, so tests may reconnect with a job env."""
    from fabric.cluster import LocalCluster

    root = tmp_path_factory.mktemp("runenv")
    env = {"FABRIC_RUNTIME_ENV_DIR": str(root / "cache"), "FABRIC_RUNTIME_ENV_KEEP": "3", "RUNENV_BASE": "base",
           **PIP_OFFLINE}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        fabric.shutdown()
        cl = LocalCluster(cpus=1, parent_pid=0, log_dir=str(root)).start()
        try:
            fabric.init(address=cl.address)
            yield {"root": root, "address": cl.address, "cache": root / "cache"}
        finally:
            fabric.shutdown()
            cl.stop()


@fabric.fn
def plain():
    import importlib.util

    return {"pid": os.getpid(), "base": os.environ.get("RUNENV_BASE"), "x": os.environ.get("RUNENV_X"),
            "cwd": os.getcwd(), "rtmod": "rtmod" in sys.modules or importlib.util.find_spec("rtmod") is not None,
            "tinypkg": importlib.util.find_spec("tinypkg") is not None}


def envd():
    import rtmod

    return {"pid": os.getpid(), "base": os.environ.get("RUNENV_BASE"), "x": os.environ.get("RUNENV_X"),
            "cwd": os.getcwd(), "value": rtmod.VALUE, "data": open("data.txt").read().strip(),
            "git": os.path.exists(".git")}


def test_env_vars_apply_to_the_call_only(rt):
    @fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "1", "RUNENV_BASE": "mine"}})
    def with_env():
        return os.getpid(), os.environ.get("RUNENV_X"), os.environ.get("RUNENV_BASE")

    before = plain.remote().result()
    pid, x, base = with_env.remote().result()
    after = plain.remote().result()
    assert (x, base) == ("1", "mine")
    assert pid == before["pid"] == after["pid"]  # one worker ran all three
    assert (after["x"], after["base"]) == (None, "base") and after["cwd"] == before["cwd"]


def test_working_dir_is_the_cwd_and_on_sys_path_and_each_env_has_its_modules(rt):
    a = fabric.fn(runtime_env={"working_dir": make_working_dir(rt["root"], "A")})(envd)
    b = fabric.fn(runtime_env={"working_dir": make_working_dir(rt["root"], "B")})(envd)
    ra = a.remote().result()
    rb = b.remote().result()
    ra2 = a.remote().result()
    after = plain.remote().result()
    assert (ra["value"], ra["data"], rb["value"], rb["data"]) == ("A", "data A", "B", "data B")
    assert ra2["value"] == "A"  # b's rtmod did not stay for a's next call, nor a's for b's
    assert ra["pid"] == rb["pid"] == after["pid"]
    assert not ra["git"]  # .git is never shipped
    assert ra["cwd"].startswith(str(rt["cache"] / "working_dir")) and ra["cwd"] != rb["cwd"]
    assert not after["rtmod"] and after["cwd"] != ra["cwd"]
    assert len(os.listdir(rt["cache"] / "working_dir")) >= 2


@fabric.fn
def child():
    import rtmod

    return os.environ.get("RUNENV_X"), rtmod.VALUE


def test_nested_calls_inherit_the_env_of_the_call_they_are_made_in(rt):
    @fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "parent"}, "working_dir": make_working_dir(rt["root"], "N")})
    def parent():
        return child.remote().result(), child.options(runtime_env={"env_vars": {"RUNENV_X": "own"}}).remote().result()

    assert parent.remote().result() == (("parent", "N"), ("own", "N"))
    with pytest.raises(ModuleNotFoundError):  # from the driver, no env to inherit
        child.remote().result()


def gang_member():
    return fabric.gang_context().rank, os.environ.get("RUNENV_X")


def test_a_gang_runs_its_members_in_its_env(rt):
    g = fabric.gang(1, runtime_env={"env_vars": {"RUNENV_X": "gang"}})
    assert fabric.get(g.run(gang_member)) == [(0, "gang")]
    own = fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "fn"}})(gang_member)
    assert fabric.get(fabric.gang(1).run(own)) == [(0, "fn")]
    assert fabric.get(g.run(own)) == [(0, "gang")]  # the gang's env, as its resources, over the function's
    with pytest.raises(TypeError, match="unknown key"):
        fabric.gang(1, runtime_env={"conda": "x"})
    assert plain.remote().result()["x"] is None


def test_generators_and_async_functions_run_in_their_env(rt):
    @fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "gen"}})
    def gen(n):
        for _ in range(n):
            yield os.environ.get("RUNENV_X")

    @fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "async"}})
    async def coro():
        return os.environ.get("RUNENV_X")

    assert [f.result() for f in gen.remote(3)] == ["gen"] * 3
    assert coro.remote().result() == "async"
    assert plain.remote().result()["x"] is None


def test_options_override_and_a_class_keeps_its_env_for_life(rt):
    @fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "decorated"}})
    def read():
        return os.environ.get("RUNENV_X")

    assert read.remote().result() == "decorated"
    assert read.options(runtime_env={"env_vars": {"RUNENV_X": "option"}}).remote().result() == "option"

    @fabric.cls(runtime_env={"env_vars": {"RUNENV_X": "cls"}, "working_dir": make_working_dir(rt["root"], "C")})
    class Holder:
        def __init__(self):
            import rtmod

            self.value = rtmod.VALUE

        def look(self):
            return self.value, os.environ.get("RUNENV_X"), open("data.txt").read().strip()

    h = Holder.remote()
    assert h.look.remote().result() == ("C", "cls", "data C")
    assert h.look.remote().result() == ("C", "cls", "data C")
    fabric.kill(h)  # (it holds the executor's one CPU)
    # .options(runtime_env=...) replaces the decorator's env (the job's still lies under it)
    other = Holder.options(runtime_env={"env_vars": {"RUNENV_X": "other"},
                                        "working_dir": make_working_dir(rt["root"], "D")}).remote()
    assert other.look.remote().result() == ("D", "other", "data D")
    fabric.kill(other)
    assert plain.remote().result()["x"] is None


def test_job_env_is_merged_under_each_function_env(rt):
    wd = make_working_dir(rt["root"], "J")
    fabric.shutdown()
    fabric.init(address=rt["address"], runtime_env={"env_vars": {"RUNENV_X": "job", "RUNENV_J": "j"},
                                                    "working_dir": wd})
    try:
        @fabric.fn(runtime_env={"env_vars": {"RUNENV_X": "fn"}})
        def both():
            import rtmod

            return os.environ.get("RUNENV_X"), os.environ.get("RUNENV_J"), rtmod.VALUE

        @fabric.fn(runtime_env={"working_dir": None})
        def no_dir():
            return os.environ.get("RUNENV_J"), os.path.exists("data.txt")

        assert both.remote().result() == ("fn", "j", "J")
        assert no_dir.remote().result() == ("j", False)
    finally:
        fabric.shutdown()
        fabric.init(address=rt["address"])
    assert plain.remote().result()["x"] is None  # a new job without the env


def test_pip_installs_once_for_concurrent_first_calls(rt):
    pkg = make_package(rt["root"])

    @fabric.fn(cpus=0.5, runtime_env={"pip": [pkg]})  # two at once on the 1-CPU executor
    def version(_):
        import tinypkg

        return tinypkg.VERSION, tinypkg.__file__

    out = fabric.get([version.remote(i) for i in range(2)])
    assert [v for v, _ in out] == ["1.2", "1.2"]
    assert all(f.startswith(str(rt["cache"] / "pip")) for _, f in out)
    assert len([d for d in os.listdir(rt["cache"] / "pip") if not d.endswith(".lock")]) == 1
    assert not plain.remote().result()["tinypkg"]  # not importable outside the env
    assert version.remote(0).result()[0] == "1.2"  # from the cache


def test_pip_output_reaches_the_driver(rt, tmp_path):
    pkg = make_package(tmp_path, "otherpkg", "0.3")
    code = f"""
import fabric
fabric.init(address={rt['address']!r})
@fabric.fn(runtime_env={{"pip": [{pkg!r}]}})
def v():
    import otherpkg
    return otherpkg.VERSION
print("got", v.remote().result())
"""
    r = run_script(code, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "got 0.3" in out
    assert "[runtime_env] pip install" in out and "Successfully installed otherpkg-0.3" in out
    assert out.count("[runtime_env] pip install") == 1


def test_a_failed_pip_install_is_a_clear_error_and_the_cluster_serves_on(rt, tmp_path):
    missing = str(tmp_path / "no-such-package")

    @fabric.fn(runtime_env={"pip": [missing]})
    def needs():
        return 1

    for _ in range(2):  # the second call of that env on that worker says the same
        with pytest.raises(fabric.RuntimeEnvSetupError) as e:
            needs.remote().result()
        msg = str(e.value)
        assert missing in msg and "pip install failed" in msg and "does not exist" in msg
        assert isinstance(e.value, fabric.FabricError)
    assert plain.remote().result()["base"] == "base"
    assert not any(d.startswith(".") or ".tmp-" in d for d in os.listdir(rt["cache"] / "pip"))


def test_bad_envs_are_refused_in_the_driver_and_the_cluster_serves_on(rt, tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="unknown key"):
        fabric.fn(runtime_env={"container": "img"})(envd)
    with pytest.raises(TypeError, match="must be a string"):
        plain.options(runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="does not exist"):
        plain.options(runtime_env={"working_dir": str(tmp_path / "missing")})
    gone = tmp_path / "gone"
    gone.mkdir()
    f = fabric.fn(runtime_env={"working_dir": str(gone)})(envd)
    gone.rmdir()
    with pytest.raises(ValueError, match="no longer exists"):
        f.remote()
    big = tmp_path / "big"
    big.mkdir()
    (big / "weights.bin").write_bytes(b"0" * 4096)
    monkeypatch.setenv("FABRIC_WORKING_DIR_LIMIT", "1KiB")
    with pytest.raises(fabric.RuntimeEnvError, match="weights.bin"):
        fabric.fn(runtime_env={"working_dir": str(big)})(envd).remote()
    assert plain.remote().result()["base"] == "base"


def test_on_a_started_cluster_each_executor_unpacks_and_installs_once(tmp_path):
    """`fabric start` plus a second `fabric executor` with a cache of its own (as another host
    would have): both get the working_dir from the cluster's store and install the package."""
    home = tmp_path / "home"
    env = dict(os.environ, FABRIC_HOME=str(home), **PIP_OFFLINE)
    env.pop("FABRIC_ADDRESS", None)
    caches = [tmp_path / "cache1", tmp_path / "cache2"]
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "1", "--detach"], capture_output=True,
                       text=True, timeout=120, env={**env, "FABRIC_RUNTIME_ENV_DIR": str(caches[0])})
    assert r.returncode == 0, r.stderr
    second = subprocess.Popen(FABRIC + ["executor", "--broker", address, "--cpus", "1"],
                              env={**env, "FABRIC_RUNTIME_ENV_DIR": str(caches[1])},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status = lambda: json.loads(subprocess.run(FABRIC + ["status", "--json"], env=env, capture_output=True,  # noqa: E731
                                                   text=True, timeout=30).stdout or "{}")
        assert wait_for(lambda: len(status().get("executors", [])) == 2, timeout=120)
        wd = make_working_dir(tmp_path, "S")
        pkg = make_package(tmp_path)
        code = f"""
import os, time, fabric
fabric.init(address={address!r})
@fabric.fn(runtime_env={{"working_dir": {wd!r}, "pip": [{pkg!r}], "env_vars": {{"RUNENV_X": "s"}}}})
def f(i):
    import rtmod, tinypkg
    time.sleep(1.0)
    return rtmod.VALUE, tinypkg.VERSION, os.environ["RUNENV_X"], open("data.txt").read().strip(), os.getcwd()
@fabric.fn
def g():
    return os.environ.get("RUNENV_X"), os.getcwd()
out = fabric.get([f.remote(i) for i in range(4)])
assert all(o[:4] == ("S", "1.2", "s", "data S") for o in out), out
assert g.remote().result()[0] is None
print("cwds", sorted(set(o[4] for o in out)))
"""
        r = run_script(code, env={k: v for k, v in env.items() if k != "FABRIC_RUNTIME_ENV_DIR"}, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        # each executor that ran a call has the working_dir once and the package once
        used = [c for c in caches if (c / "working_dir").exists()]
        assert used
        for c in used:
            assert len([d for d in os.listdir(c / "working_dir") if not d.endswith(".lock")]) == 1
            assert len([d for d in os.listdir(c / "pip") if not d.endswith(".lock")]) == 1
        assert status()["executors"]  # still serving
    finally:
        second.terminate()
        second.wait(10)
        subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


def test_a_driver_with_a_store_of_its_own(rt, tmp_path):
    """fabric.init(store=...) in the driver only: workers read the zip from the store the driver
    named; a store they cannot reach (the driver's memory://) is a clear error."""
    wd = make_working_dir(tmp_path, "T")
    try:
        fabric.shutdown()
        fabric.init(address=rt["address"], store=str(tmp_path / "own-store"))
        f = fabric.fn(runtime_env={"working_dir": wd})(envd)
        assert f.remote().result()["value"] == "T"
        fabric.shutdown()
        fabric.init(address=rt["address"], store="memory://runenv-test")
        # (another content: the first is unpacked on this host already, and needs no store now)
        g = fabric.fn(runtime_env={"working_dir": make_working_dir(tmp_path, "M")})(envd)
        with pytest.raises(fabric.RuntimeEnvSetupError, match="memory://runenv-test"):
            g.remote().result()
    finally:
        fabric.shutdown()
        from fabric import storage

        storage.set_default(None)
        fabric.init(address=rt["address"])
    assert plain.remote().result()["base"] == "base"


class Reader:
    def look(self):
        return open("data.txt").read().strip(), os.getcwd()


def test_each_host_keeps_few_folders_and_spares_those_in_use(rt):
    """FABRIC_RUNTIME_ENV_KEEP=3 here: making a 4th working_dir removes the least recently used
    one, not the one an instance lives in; a function whose folder went makes it again."""
    folders = lambda: sorted(d for d in os.listdir(rt["cache"] / "working_dir")  # noqa: E731
                             if not d.endswith(".lock") and ".tmp-" not in d)
    h = fabric.cls(cpus=0.5, runtime_env={"working_dir": make_working_dir(rt["root"], "H")})(Reader).remote()
    data, home = h.look.remote().result()
    assert data == "data H"
    fns = [fabric.fn(cpus=0.5, runtime_env={"working_dir": make_working_dir(rt["root"], f"E{i}")})(envd)
           for i in range(4)]
    cwds = [f.remote().result()["cwd"] for f in fns]
    assert os.path.basename(home) in folders() and len(folders()) == 4  # 3 kept + the one in use
    assert os.path.basename(cwds[0]) not in folders()
    assert h.look.remote().result() == ("data H", home)
    assert fns[0].remote().result()["data"] == "data E0"  # made again
    assert os.path.basename(cwds[0]) in folders() and len(folders()) == 4
    fabric.kill(h)
