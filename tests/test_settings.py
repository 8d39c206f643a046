"""fabric/settings.py is the one place that reads FABRIC_* variables, and docs/settings.md is
made from it."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from fabric import settings
from conftest import REPO

PKG = os.path.join(REPO, "fabric")
# names fabric writes or strips but never reads as a setting
NOT_READ = {"FABRIC_STORE_SECRET"}  # stripped from workers' environments (docs/security.md)


def _sources():
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                with open(p) as fh:
                    yield os.path.relpath(p, REPO), fh.read()


def test_docs_table_is_generated_from_the_module():
    with open(os.path.join(REPO, "docs", "settings.md")) as f:
        docs = f.read()
    assert docs == settings.markdown(), \
        "docs/settings.md differs from fabric/settings.py: run `python -m fabric.settings > docs/settings.md`"


def test_every_variable_fabric_names_is_a_setting():
    known = set(settings.variables()) | NOT_READ
    unknown = {}
    for path, text in _sources():
        for name in re.findall(r"\bFABRIC_[A-Z][A-Z0-9_]*\b", text):
            if name not in known:
                unknown.setdefault(name, path)
    assert not unknown, f"FABRIC_* variables not declared in fabric/settings.py: {unknown}"


def test_no_module_reads_the_environment_for_a_setting():
    # a read: os.environ.get("FABRIC_..."), os.environ["FABRIC_..."] not followed by "=", getenv
    read = re.compile(r"""(?:environ\.get|getenv)\(\s*["']FABRIC_|environ\[\s*["']FABRIC_\w+["']\s*\](?!\s*=[^=])""")
    found = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}" for path, text in _sources()
             for m in read.finditer(text) if not path.endswith("settings.py")]
    assert not found, f"read fabric.settings.get() instead of os.environ: {found}"


def test_load_types_and_defaults():
    s = settings.load({})
    assert s.max_pending == 100_000 and s.heartbeat_timeout == 10.0 and s.address is None
    assert s.allow_insecure_remote is False and s.ml_blocks == "shm"
    s = settings.load({"FABRIC_MAX_PENDING": "7", "FABRIC_DRIVER_TIMEOUT": "2.5", "FABRIC_GPUS": "",
                       "FABRIC_ALLOW_INSECURE_REMOTE": "1", "FABRIC_SERVE_PORT": "9000"})
    assert (s.max_pending, s.driver_timeout, s.gpus, s.allow_insecure_remote, s.serve_port) == (7, 2.5, "", True, 9000)
    assert settings.load({"FABRIC_ALLOW_INSECURE_REMOTE": ""}).allow_insecure_remote is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_pending = 1


def test_a_bad_number_names_its_variable():
    with pytest.raises(ValueError, match="FABRIC_MAX_CALLS must be a whole number, got 'lots'"):
        settings.load({"FABRIC_MAX_CALLS": "lots"})
    with pytest.raises(ValueError, match="FABRIC_HEARTBEAT_TIMEOUT must be a number, got ''"):
        settings.load({"FABRIC_HEARTBEAT_TIMEOUT": ""})


def test_read_once_until_reloaded(monkeypatch):
    before = settings.get()
    assert settings.get() is before  # read once
    monkeypatch.setenv("FABRIC_PREFETCH", "3")  # tests/conftest.py: setenv re-reads
    assert settings.get().prefetch == 3 and settings.of("FABRIC_PREFETCH") == 3
    os.environ["FABRIC_PREFETCH"] = "5"  # a plain write is not seen until reload()
    assert settings.get().prefetch == 3
    assert settings.reload().prefetch == 5
    monkeypatch.undo()
    assert "FABRIC_PREFETCH" not in os.environ and settings.get().prefetch == before.prefetch


def test_a_process_reads_its_own_environment():
    env = dict(os.environ, FABRIC_MAX_PENDING="123", FABRIC_JOURNAL_MAX_RECORD="4096")
    out = subprocess.run([sys.executable, "-c", "from fabric import client, settings; from fabric.broker import journal; "
                          "print(client.MAX_PENDING, journal.MAX_RECORD, settings.get().max_pending)"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.split() == ["123", "4096", "123"], out.stderr


def test_a_bad_number_fails_at_import_with_its_name():
    env = dict(os.environ, FABRIC_LOG_RATE="fast")
    out = subprocess.run([sys.executable, "-c", "import fabric"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode != 0 and "FABRIC_LOG_RATE must be a whole number, got 'fast'" in out.stderr
