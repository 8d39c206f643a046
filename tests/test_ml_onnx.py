"""ONNX export of every framework (on the embedded cluster), parity, preprocessor folding,
OnnxPredictor and BatchPredictor, and the bad inputs each gets a clear error for.

Checkpoint directories are made by hand in the layout the trainers write (model.ubj,
model_full.pt, model.keras, model/ for transformers), so these tests do not depend on training."""
import importlib.util
import json
import os

import cloudpickle
import numpy as np
import pandas as pd
import pytest

import fabric
from fabric import ml
from fabric.ml import preprocessing as P
from fabric.ml.checkpoint import Checkpoint, save_preprocessor
from fabric.ml.export import ParityError, UnknownCheckpoint, UnsupportedModel
from fabric.ml.predictors.onnx import InvalidInput, OnnxPredictor

# frameworks import slowly (tens of seconds per process on a loaded 2-core machine)
pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(600)]

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
HAVE_HF = importlib.util.find_spec("transformers") is not None


def raw_frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.normal(40, 12, n), "visits": rng.integers(0, 9, n),
                       "plan": rng.choice(["basic", "plus", "pro"], n), "y": rng.integers(0, 2, n)})
    df.loc[::37, "age"] = np.nan
    return df


def make_ckpt(d, meta, preprocessor=None):
    os.makedirs(d, exist_ok=True)
    save_preprocessor(str(d), preprocessor)
    ck = Checkpoint.from_directory(str(d))
    ck.set_metadata(meta)
    return ck


@pytest.fixture(scope="module")
def xgb_ckpt(tmp_path_factory):
    xgb = pytest.importorskip("xgboost")
    df = raw_frame()
    pre = P.Chain(P.SimpleImputer(["age"]), P.StandardScaler(["age", "visits"]), P.OneHotEncoder(["plan"]))
    pre.fit(ml.from_pandas(df))
    t = pre.transform_batch(df)
    feats = [c for c in t.columns if c != "y"]
    y = (t["age"].to_numpy() + t["plan_pro"].to_numpy() > 0.3).astype(int)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 4}, xgb.DMatrix(t[feats], y), 25)
    d = tmp_path_factory.mktemp("xgb")
    booster.save_model(str(d / "model.ubj"))
    ck = make_ckpt(d, {"framework": "xgboost", "label_column": "y", "feature_columns": feats}, pre)
    return ck, booster, pre, df, feats


def test_xgboost_export_folds_the_preprocessor_and_records_parity(xgb_ckpt):
    xgb = pytest.importorskip("xgboost")
    ck, booster, pre, df, feats = xgb_ckpt
    out = ml.export_onnx(ck, sample=df)
    meta = out.get_metadata()
    assert meta["framework"] == "onnx" and meta["source_framework"] == "xgboost"
    assert meta["preprocessor_folded"] is True
    assert meta["input_names"] == ["age", "visits", "plan"]      # raw columns, not features
    assert 0 <= meta["parity_max_abs_diff"] < 1e-5 and meta["parity_max_rel_diff"] < 1e-4
    assert not out.exists("preprocessor.pkl")
    # the .onnx alone, with plain onnxruntime, maps raw columns to the native model's output
    with out.as_directory() as d:
        sess = ort.InferenceSession(os.path.join(d, "model.onnx"))
    fresh = raw_frame(50, seed=7)
    got = sess.run(["probabilities"], {"age": fresh["age"].to_numpy(), "visits": fresh["visits"].to_numpy(),
                                       "plan": fresh["plan"].to_numpy().astype(object)})[0][:, 1]
    booster.feature_names = None
    want = booster.predict(xgb.DMatrix(pre.transform_batch(fresh)[feats].to_numpy(np.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # OnnxPredictor over a DataFrame (label column tolerated) gives the same, in the column
    # XGBoostPredictor gives (P(class 1) for binary:logistic)
    pred = OnnxPredictor.from_checkpoint(out)
    res = pred.predict(fresh)
    assert list(res.columns) == ["predictions"] and meta["predictions"]["output"] == "probabilities"
    np.testing.assert_allclose(res["predictions"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    native = ml.XGBoostPredictor.from_checkpoint(ck).predict(fresh)
    assert list(native.columns) == list(res.columns)
    np.testing.assert_allclose(res["predictions"].to_numpy(), native["predictions"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert set(pred.predict({c: fresh[c].to_numpy() for c in fresh.columns})) == {"predictions"}
    # the graph's own outputs, by their ONNX names, as predict gave them before
    graph = OnnxPredictor.from_checkpoint(out, outputs="graph").predict(fresh)
    assert list(graph.columns) == ["label", "probabilities"]
    np.testing.assert_allclose(np.stack(graph["probabilities"])[:, 1], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outputs must be 'predictions'"):
        OnnxPredictor.from_checkpoint(out, outputs="all")
    # an export made before the metadata named its predictions output: inferred from the names
    old = dict(meta)
    del old["predictions"]
    with out.as_directory() as d, open(os.path.join(d, "model.onnx"), "rb") as f:
        legacy = OnnxPredictor(f.read(), metadata=old)
    np.testing.assert_allclose(legacy.predict(fresh)["predictions"].to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_export_without_folding_keeps_the_preprocessor_beside(xgb_ckpt):
    ck, booster, pre, df, feats = xgb_ckpt
    out = ml.export_onnx(ck, sample=df, fold_preprocessor=False)
    meta = out.get_metadata()
    assert meta["preprocessor_folded"] is False and meta["input_names"] == ["input"]
    assert out.exists("preprocessor.pkl")
    a = OnnxPredictor.from_checkpoint(out).predict(df.head(20))
    b = OnnxPredictor.from_checkpoint(ml.export_onnx(ck, sample=df)).predict(df.head(20))
    np.testing.assert_allclose(a["predictions"].to_numpy(), b["predictions"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_xgboost_multiclass_without_sample(tmp_path):
    xgb = pytest.importorskip("xgboost")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    b = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3}, xgb.DMatrix(x, y), 10)
    b.save_model(str(tmp_path / "model.ubj"))
    ck = make_ckpt(tmp_path, {"framework": "xgboost"})
    out = ml.export_onnx(ck)   # random rows of the booster's width
    meta = out.get_metadata()
    assert meta["input_names"] == ["input"] and meta["parity_rows"] == 64
    probs = OnnxPredictor.from_checkpoint(out).predict(x[:10])["predictions"]   # every class's, as native
    np.testing.assert_allclose(probs, b.predict(xgb.DMatrix(x[:10])), rtol=1e-5, atol=1e-6)


def mlp(n_in=6, n_out=2):
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(n_in, 16), torch.nn.ReLU(), torch.nn.Linear(16, n_out)).eval()


def test_torch_export_has_a_dynamic_batch_and_folds_a_concatenator(tmp_path):
    torch = pytest.importorskip("torch")
    df = raw_frame()
    pre = P.Chain(P.SimpleImputer(["age"]), P.StandardScaler(["age", "visits"]), P.OneHotEncoder(["plan"]),
                  P.Concatenator(exclude=["y"], output_column_name="x"))
    pre.fit(ml.from_pandas(df))
    model = mlp(5)
    torch.save(model, str(tmp_path / "model_full.pt"))
    ck = make_ckpt(tmp_path, {"framework": "torch", "label_column": "y", "feature_columns": ["x"]}, pre)
    out = ml.export_onnx(ck, sample=df.head(3))
    meta = out.get_metadata()
    assert meta["preprocessor_folded"] and meta["input_names"] == ["age", "visits", "plan"]
    pred = OnnxPredictor.from_checkpoint(out)
    for n in (1, 257):   # any batch size, not only the sample's
        batch = raw_frame(n, seed=n)
        got = np.stack(pred.predict(batch)["predictions"])
        x = np.stack(pre.transform_batch(batch)["x"].to_numpy()).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batch_predictor_with_onnx_over_a_dataset(xgb_ckpt):
    ck, booster, pre, df, feats = xgb_ckpt
    out = ml.export_onnx(ck, sample=df)
    ds = ml.from_pandas(raw_frame(600, seed=3).drop(columns=["y"])).repartition(3)
    BatchPredictor = pytest.importorskip("fabric.ml.predictors.batch").BatchPredictor
    res = BatchPredictor.from_checkpoint(out, OnnxPredictor).predict(ds, batch_size=128)
    got = res.to_pandas()
    assert len(got) == 600
    local = OnnxPredictor.from_checkpoint(out).predict(raw_frame(600, seed=3).drop(columns=["y"]))
    assert list(got.columns) == ["predictions"]
    np.testing.assert_allclose(got["predictions"].to_numpy(), local["predictions"].to_numpy(), rtol=1e-6)


# ------------------------------------------------------------------ TensorFlow / Keras
@pytest.mark.skipif(not HAVE_TF, reason="the [tf] extra (tensorflow) is not installed")
def test_keras_export_and_an_op_with_no_onnx_form(tmp_path):
    import keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), name="features")
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inp)))
    (tmp_path / "ok").mkdir()
    model.save(str(tmp_path / "ok" / "model.keras"))
    ck = make_ckpt(tmp_path / "ok", {"framework": "tensorflow", "feature_columns": ["a", "b", "c", "d"]})
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    out = ml.export_onnx(ck, sample=pd.DataFrame(x, columns=list("abcd")))
    meta = out.get_metadata()
    assert meta["input_names"] == ["a", "b", "c", "d"] and meta["parity_max_abs_diff"] < 1e-5
    got = np.stack(OnnxPredictor.from_checkpoint(out).predict(pd.DataFrame(x[:7], columns=list("abcd")))["predictions"])
    np.testing.assert_allclose(got, model.predict(x[:7], verbose=0), rtol=1e-5, atol=1e-5)

    # tf2onnx has no conversion for Bucketize: keras' export only logs that and writes the file
    bad = keras.Sequential([keras.Input((4,)), keras.layers.Discretization(bin_boundaries=[0.0, 1.0], name="buckets")])
    (tmp_path / "bad").mkdir()
    bad.save(str(tmp_path / "bad" / "model.keras"), )
    ck = make_ckpt(tmp_path / "bad", {"framework": "tensorflow"})
    with pytest.raises(UnsupportedModel) as e:
        ml.export_onnx(ck)
    assert "Bucketize" in str(e.value) and "buckets" in str(e.value)


# ------------------------------------------------------------------ transformers
def tiny_text_model(d):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "very", "not", "a", "plot"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2)
    transformers.set_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(os.path.join(d, "model"))
    fast.save_pretrained(os.path.join(d, "model"))
    return model, fast


@pytest.mark.skipif(not HAVE_HF, reason="the [hf] extra (transformers) is not installed")
def test_transformers_export_with_dynamic_batch_and_sequence(tmp_path):
    import torch
    model, tok = tiny_text_model(tmp_path)
    ck = make_ckpt(tmp_path, {"framework": "transformers"})
    out = ml.export_onnx(ck, sample=["good movie", "not a very good plot at all", "bad"])
    meta = out.get_metadata()
    assert meta["input_names"][:2] == ["input_ids", "attention_mask"] and meta["tokenizer"] == "tokenizer"
    pred = OnnxPredictor.from_checkpoint(out)
    texts = ["very very bad movie plot", "good"]       # other batch and sequence lengths
    got = pred.predict(texts)["logits"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    df = pred.predict(pd.DataFrame({"text": texts}))
    np.testing.assert_allclose(np.stack(df["logits"]), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bad input
def test_unknown_checkpoint_kinds(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UnknownCheckpoint, match="framework None"):
        ml.export_onnx(str(tmp_path / "a"))
    ck = make_ckpt(tmp_path / "b", {"framework": "sklearn"})
    with pytest.raises(UnknownCheckpoint, match="'sklearn'"):
        ml.export_onnx(ck)
    with pytest.raises(ValueError, match="not an ONNX one"):
        OnnxPredictor.from_checkpoint(ck)


class Noisy:
    """A torch model whose forward is not deterministic (noise injection left on)."""


def test_unsupported_torch_op_and_parity_failure(tmp_path):
    torch = pytest.importorskip("torch")
    cloudpickle.register_pickle_by_value(__import__(__name__))

    class Gamma(torch.nn.Module):
        def forward(self, x):
            return torch.lgamma(x)

    class WithNoise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x) + torch.rand_like(x[:, :1])

    for name, m in (("gamma", Gamma()), ("noise", WithNoise())):
        (tmp_path / name).mkdir()
        torch.save(m, str(tmp_path / name / "model_full.pt"), pickle_module=cloudpickle)
    with pytest.raises(UnsupportedModel, match="lgamma"):
        ml.export_onnx(make_ckpt(tmp_path / "gamma", {"framework": "torch"}), sample=np.ones((4, 3), np.float32))
    with pytest.raises(ParityError) as e:
        ml.export_onnx(make_ckpt(tmp_path / "noise", {"framework": "torch"}), sample=np.ones((64, 3), np.float32))
    assert "max abs diff" in str(e.value) and "max rel diff" in str(e.value)


def test_bad_predict_batches_are_named(xgb_ckpt):
    ck, booster, pre, df, feats = xgb_ckpt
    out = ml.export_onnx(ck, sample=df)
    pred = OnnxPredictor.from_checkpoint(out)
    with pytest.raises(InvalidInput, match=r"lacks the model's input columns \['plan'\]"):
        pred.predict(df.drop(columns=["plan"]))
    with pytest.raises(InvalidInput, match=r"does not take: \['color'\]"):
        pred.predict(df.assign(color="red"))
    assert len(OnnxPredictor.from_checkpoint(out, extra_columns="ignore").predict(df.assign(color="red"))) == len(df)
    with pytest.raises(InvalidInput, match="'visits' must be numeric"):
        pred.predict(df.assign(visits="many"))
    with pytest.raises(InvalidInput, match="'plan' must hold strings"):
        pred.predict(df.assign(plan=1.5))
    with pytest.raises(InvalidInput, match="whole numbers"):
        pred.predict(df.assign(visits=0.5))
    unfolded = OnnxPredictor.from_checkpoint(ml.export_onnx(ck, sample=df, fold_preprocessor=False))
    with pytest.raises(InvalidInput, match="takes 5 features per row, the batch has 3"):
        unfolded.predict(np.zeros((2, 3), np.float32))
    # the cluster keeps serving
    assert fabric.fn(lambda: 41 + 1).remote().result(timeout=60) == 42
