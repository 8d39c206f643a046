"""The README's first command: functions/quickstart.py runs the whole flow (data, XGBoost and
PyTorch through one trainer interface, tune, ONNX export, serving, one real HTTP request) on an
embedded cluster, and a second run finds every stage cached."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, free_port

pytest.importorskip("xgboost", reason="the quickstart needs the [quickstart] extra")
pytest.importorskip("torch", reason="the quickstart needs the [quickstart] extra")
pytest.importorskip("onnxruntime", reason="the quickstart needs the [quickstart] extra")


def _run(home, port):
    env = dict(os.environ, FABRIC_HOME=str(home), FABRIC_SERVE_PORT=str(port))
    env.pop("FABRIC_ADDRESS", None)
    r = subprocess.run([sys.executable, os.path.join(REPO, "functions", "quickstart.py")], capture_output=True,
                       text=True, timeout=900, env=env, cwd=str(home))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _answer(out):
    start = out.index("{\n")
    end = out.index("\n}", start) + 2
    return json.loads(out[start:end])


@pytest.mark.timeout(1200)
def test_the_quickstart_flow_end_to_end_and_cached_on_the_second_run(tmp_path):
    port = free_port()
    first = _run(tmp_path, port)
    for stage in ("trained xgboost", "trained torch", "tuned: best params", "exported to ONNX", "answered over HTTP"):
        assert stage in first, first
    assert "(cached)" not in first
    answer = _answer(first)
    assert answer["id"] == "quickstart" and answer["model_name"] == "churn"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["shape"] == [3] and set(outputs["label"]["data"]) <= {0, 1}
    probs = outputs["probabilities"]
    assert probs["shape"] == [3, 2]
    for p0, p1 in zip(probs["data"][0::2], probs["data"][1::2]):
        assert abs(p0 + p1 - 1) < 1e-5  # a real classifier's probabilities, row by row
    parity = float(re.search(r"parity max abs diff ([0-9.e+-]+)", first).group(1))
    assert parity < 1e-4

    second = _run(tmp_path, port)
    for stage in ("trained xgboost", "trained torch", "tuned: best params", "exported to ONNX"):
        line = next(line for line in second.splitlines() if stage in line)
        assert line.endswith("(cached)"), line
    assert _answer(second)["outputs"] == answer["outputs"]  # the same model answers the same rows
