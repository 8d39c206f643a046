"""TransformersTrainer: a tiny BERT (built from a config, no model hub) fine-tuned by a
transformers.Trainer on torch DDP across 2 gang members; its logs as metrics, its saves as
checkpoints; then TransformersPredictor, the ONNX export and OnnxPredictor on that checkpoint."""
import importlib.util

import numpy as np
import pandas as pd
import pytest

import fabric
from fabric import ml
from fabric.ml.result import TrainingFailedError

if importlib.util.find_spec("transformers") is None:
    pytest.skip("the [hf] extra (transformers) is not installed", allow_module_level=True)

# frameworks import slowly (tens of seconds per process on a loaded 2-core machine)
pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(600)]

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "very", "not", "a", "plot", "fun", "dull"]


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        good = bool(rng.integers(0, 2))
        words = rng.choice(["good", "fun"] if good else ["bad", "dull"], 2).tolist() + ["movie"]
        texts.append(" ".join(rng.permutation(words)))
        labels.append(int(good))
    enc = tokenizer()(texts, padding="max_length", max_length=6, truncation=True)
    return texts, pd.DataFrame({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                "labels": labels})


def trainer_init(train_dataset, eval_dataset, **config):
    import tempfile

    import transformers

    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=32, num_labels=2)
    transformers.set_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=config["steps"],
        learning_rate=config["lr"], logging_steps=2, save_steps=config["steps"], save_strategy="steps",
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    assert len(train_dataset) == 64  # whole: Accelerate shards by rank
    return transformers.Trainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer())


def test_two_workers_ddp_logs_saves_predict_and_export(tmp_path):
    texts, df = data()
    trainer = ml.TransformersTrainer(trainer_init, trainer_init_config={"lr": 5e-3, "steps": 6},
                                     datasets={"train": ml.from_pandas(df)},
                                     scaling_config=ml.ScalingConfig(num_workers=2),
                                     run_config=ml.RunConfig(name="hf", storage_path=str(tmp_path)))
    result = trainer.fit()
    hist = result.metrics_dataframe
    assert "loss" in hist.columns and hist["loss"].notna().sum() >= 2
    assert result.metrics["step"] == 6
    ck = result.checkpoint
    assert ck.get_metadata()["framework"] == "transformers" and ck.exists("model/config.json")

    pred = ml.TransformersPredictor.from_checkpoint(ck)
    native = pred.predict(texts[:5])["logits"]
    assert native.shape == (5, 2)
    labels = ml.TransformersPredictor.from_checkpoint(ck, task="text-classification").predict(
        pd.DataFrame({"text": texts[:3]}))
    assert len(labels) == 3 and "label" in labels.columns

    out = ml.export_onnx(ck, sample=texts[:8])
    assert out.get_metadata()["parity_max_abs_diff"] < 1e-4
    got = ml.OnnxPredictor.from_checkpoint(out).predict(texts[:5])["logits"]
    np.testing.assert_allclose(got, native, rtol=1e-4, atol=1e-5)


def test_init_that_returns_no_trainer_is_named(tmp_path):
    trainer = ml.TransformersTrainer(lambda train, ev, **c: "not a trainer",
                                     datasets={"train": ml.from_pandas(data(8)[1])},
                                     scaling_config=ml.ScalingConfig(num_workers=2),
                                     run_config=ml.RunConfig(name="hfbad", storage_path=str(tmp_path)))
    with pytest.raises(TrainingFailedError, match=r"TransformersTrainer: the training loop raised on rank [01] "
                       r"of 2: TypeError: trainer_init_per_worker must return a transformers.Trainer, got str") as e:
        trainer.fit()
    assert isinstance(e.value.__cause__, TypeError)
    assert fabric.fn(lambda: 2).remote().result(timeout=60) == 2
