"""functions/tabular_swap.py, run as a user runs it: one tabular task trained by XGBoostTrainer,
TorchTrainer and (with the [tf] extra) TensorflowTrainer on 2 workers each, with the same
datasets, preprocessor, configs, checkpoint and batch prediction; only the trainer class changes."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("xgboost", reason="tabular_swap needs the [ml] extra")
pytest.importorskip("torch", reason="tabular_swap needs the [torch] extra")


@pytest.mark.timeout(900)
def test_one_script_trains_each_framework_by_changing_the_trainer_class(tmp_path):
    env = dict(os.environ, FABRIC_HOME=str(tmp_path / "home"), TABULAR_SWAP_STORAGE=str(tmp_path / "runs"))
    env.pop("FABRIC_ADDRESS", None)
    r = subprocess.run([sys.executable, os.path.join(REPO, "functions", "tabular_swap.py")], capture_output=True,
                       text=True, timeout=840, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.rstrip().endswith("swap ok"), r.stdout
    found = dict(re.findall(r"^\s*(\w+): accuracy ([0-9.]+)", r.stdout, re.M))
    expected = {"xgboost", "torch"}
    if importlib.util.find_spec("tensorflow") is not None:  # the script's own rule for the [tf] extra
        expected.add("tensorflow")
    assert set(found) == expected, r.stdout
    for name, acc in found.items():
        # the label is a noisy logistic function of the features: each framework must learn it,
        # from the same preprocessed columns, well above the ~0.5 of a constant guess
        assert float(acc) > 0.75, (name, r.stdout)
    for name in expected:  # each trainer wrote its own run, with its checkpoint, into the shared storage
        assert (tmp_path / "runs" / f"swap-{name}").is_dir(), sorted(os.listdir(tmp_path / "runs"))
