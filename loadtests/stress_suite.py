"""Run the test suite N times in a row under background load, and log each run's counts.

"The suite passes ten times in a row under stress-like load" is a claim this script makes
checkable: it starts the load (``stress-ng`` when installed, else Python CPU burners), runs
pytest ``--runs`` times, one after the other, and appends one line per run to ``--log``
(passed, failed, errors, skipped, seconds, the ids of what failed), then a verdict. It exits 0
only if every run passed. The load runs for the whole series and is stopped at the end (or on
Ctrl-C); fabric's settings are left as they are unless ``--env`` says otherwise.

    python loadtests/stress_suite.py --runs 10 --cpu 2 --log stress.log            # whole suite
    python loadtests/stress_suite.py --runs 1 --cpu 2 -- tests/test_errors.py -k cancel

Arguments after ``--`` go to pytest (default: ``tests/``). Timings under load are not what
this measures: only pass/fail counts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _burn():  # one CPU burner (when stress-ng is not installed)
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


class Load:
    """Background load for the whole series: ``stress-ng --cpu N [--vm M --vm-bytes B] [--io K]``,
    or N Python processes spinning when stress-ng is not there."""

    def __init__(self, cpu, vm, vm_bytes, io, python=False):
        self.cpu, self.vm, self.vm_bytes, self.io = cpu, vm, vm_bytes, io
        self.proc, self.burners = None, []
        self.tool = None if python else shutil.which("stress-ng")

    def describe(self):
        if not (self.cpu or self.vm or self.io):
            return "none"
        if self.tool:
            return shlex.join(["stress-ng", *self.command()[1:]])
        return f"{self.cpu} Python CPU burners (stress-ng is not installed; vm/io load not made)"

    def command(self):
        cmd = [self.tool, "--cpu", str(self.cpu), "--quiet"]
        if self.vm:
            cmd += ["--vm", str(self.vm), "--vm-bytes", self.vm_bytes]
        if self.io:
            cmd += ["--io", str(self.io)]
        return cmd

    def start(self):
        if self.tool:
            if self.cpu or self.vm or self.io:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, start_new_session=True)
        else:
            for _ in range(self.cpu):
                p = multiprocessing.Process(target=_burn, daemon=True)
                p.start()
                self.burners.append(p)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for p in self.burners:
            p.kill()
            p.join()


def counts(junit_path):
    """(passed, failed, errors, skipped, ids of failed/errored tests) from pytest's JUnit XML."""
    root = ET.parse(junit_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failures = errors = skipped = 0
    bad = []
    for s in suites:
        tests += int(s.get("tests", 0))
        failures += int(s.get("failures", 0))
        errors += int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                bad.append(f"{case.get('classname')}::{case.get('name')}")
    return tests - failures - errors - skipped, failures, errors, skipped, bad


def run_once(pytest_args, env, timeout):
    """One pytest run in its own process group (killed whole on timeout)."""
    with tempfile.TemporaryDirectory(prefix="fabric-stress-") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True, text=True)
        try:
            out, _ = p.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            timed_out = True
        took = time.monotonic() - t0
        rec = {"rc": p.returncode, "seconds": round(took, 1), "timed_out": timed_out}
        if os.path.exists(junit):
            rec["passed"], rec["failed"], rec["errors"], rec["skipped"], rec["failed_ids"] = counts(junit)
        else:  # pytest did not get as far as writing its report (collection error, killed)
            rec.update(passed=0, failed=0, errors=1, skipped=0, failed_ids=["(no report: see the tail)"])
        rec["ok"] = p.returncode == 0 and not timed_out and rec["failed"] == 0 and rec["errors"] == 0
        rec["tail"] = out[-3000:] if not rec["ok"] else ""
        return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = ["tests/"]
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:] or pytest_args
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs in a row (default 10)")
    ap.add_argument("--cpu", type=int, default=os.cpu_count() or 1,
                    help="CPU stressors (default: one per core); 0 for none")
    ap.add_argument("--vm", type=int, default=0, help="stress-ng memory stressors (default 0)")
    ap.add_argument("--vm-bytes", default="256M", help="memory per --vm stressor (default 256M)")
    ap.add_argument("--io", type=int, default=0, help="stress-ng sync() stressors (default 0)")
    ap.add_argument("--python-burners", action="store_true", help="Python burners even if stress-ng is installed")
    ap.add_argument("--log", default=os.path.join(REPO, "loadtests", "stress_suite.log"),
                    help="file the runs are appended to (default loadtests/stress_suite.log)")
    ap.add_argument("--run-timeout", type=float, default=4 * 3600, help="seconds one run may take (default 4 h)")
    ap.add_argument("--stop-on-failure", action="store_true", help="stop the series at the first failed run")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set for the test runs (e.g. a setting); recorded in the log")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k] = v
    load = Load(a.cpu, a.vm, a.vm_bytes, a.io, python=a.python_burners)
    log = open(a.log, "a", buffering=1)

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")

    now = lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    say(f"# {now()} stress_suite: {a.runs} runs of pytest {shlex.join(pytest_args)}; load: {load.describe()}; "
        f"{os.cpu_count()} cores; env overrides: {a.env or 'none'}")
    results = []
    load.start()
    try:
        for n in range(1, a.runs + 1):
            rec = run_once(pytest_args, env, a.run_timeout)
            results.append(rec)
            say(f"{now()} run {n}/{a.runs}: {'PASS' if rec['ok'] else 'FAIL'} {rec['passed']} passed, "
                f"{rec['failed']} failed, {rec['errors']} errors, {rec['skipped']} skipped in {rec['seconds']} s"
                f"{' (timed out)' if rec['timed_out'] else ''}"
                + (f"; failed: {', '.join(rec['failed_ids'])}" if rec["failed_ids"] else ""))
            log.write("  " + json.dumps({k: v for k, v in rec.items() if k != "tail"}) + "\n")
            if rec["tail"]:
                log.write("".join(f"  | {line}\n" for line in rec["tail"].splitlines()))
            if not rec["ok"] and a.stop_on_failure:
                break
    finally:
        load.stop()
    passed = sum(r["ok"] for r in results)
    in_a_row = 0
    for r in results:
        in_a_row = in_a_row + 1 if r["ok"] else 0
    say(f"# {now()} verdict: {'PASS' if passed == a.runs else 'FAIL'}: {passed} of {a.runs} runs passed "
        f"({in_a_row} in a row at the end)")
    log.close()
    return 0 if passed == a.runs else 1


if __name__ == "__main__":
    sys.exit(main())
