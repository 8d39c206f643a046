"""fabric.ml.preprocessing on the embedded cluster: statistics from per-block partials match the
same statistics computed on the whole frame; transforms on Datasets match transform_batch."""
import pickle

import cloudpickle
import numpy as np
import pandas as pd
import pytest

import fabric
from fabric import ml
from fabric.ml import preprocessing as pp

pytestmark = pytest.mark.usefixtures("cluster")


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    n = 200
    z = rng.standard_normal(n) * 3 + 7
    z[::7] = np.nan
    return pd.DataFrame({"x": rng.standard_normal(n) * 10 + 5, "z": z, "k": rng.integers(0, 4, n),
                         "cat": rng.choice(["red", "green", "blue"], n), "y": rng.choice(["no", "yes"], n)})


@pytest.fixture(scope="module")
def ds(frame):
    return ml.from_pandas(frame, override_num_blocks=5)


def test_standard_scaler(frame, ds):
    s = pp.StandardScaler(["x", "z"]).fit(ds)
    assert s.fitted
    for c in ("x", "z"):
        assert s.stats_[c]["mean"] == pytest.approx(frame[c].mean())
        assert s.stats_[c]["std"] == pytest.approx(frame[c].std(ddof=0))
    out = s.transform(ds).to_pandas()
    assert out["x"].mean() == pytest.approx(0, abs=1e-9) and out["x"].std(ddof=0) == pytest.approx(1)
    pd.testing.assert_frame_equal(out, s.transform_batch(frame))


def test_standard_scaler_constant_column():
    d = ml.from_pandas(pd.DataFrame({"c": [2.0] * 6}), override_num_blocks=2)
    s = pp.StandardScaler(["c"]).fit(d)
    assert s.stats_ == {"c": {"mean": 2.0, "std": 0.0}}
    assert s.transform(d).to_pandas()["c"].tolist() == [0.0] * 6   # std 0 treated as 1


def test_min_max_scaler(frame, ds):
    s = pp.MinMaxScaler(["x"]).fit(ds)
    assert s.stats_ == {"x": {"min": frame["x"].min(), "max": frame["x"].max()}}
    out = s.transform(ds).to_pandas()
    assert out["x"].min() == 0 and out["x"].max() == 1


def test_simple_imputer(frame, ds):
    mean = pp.SimpleImputer(["z"]).fit(ds)
    assert mean.stats_["z"] == pytest.approx(frame["z"].mean())
    out = mean.transform(ds).to_pandas()
    assert out["z"].isna().sum() == 0 and frame["z"].isna().sum() > 0
    mf = pp.SimpleImputer(["cat"], strategy="most_frequent").fit(ds)
    assert mf.stats_["cat"] == frame["cat"].value_counts().idxmax()
    const = pp.SimpleImputer(["z"], strategy="constant", fill_value=-1.0)
    assert const.fitted and const.stats_ == {"z": -1.0}
    assert (const.fit(ds).transform(ds).to_pandas()["z"] == -1.0).sum() == frame["z"].isna().sum()


def test_one_hot_encoder(frame, ds):
    e = pp.OneHotEncoder(["cat"]).fit(ds)
    assert e.stats_ == {"cat": ["blue", "green", "red"]}
    out = e.transform(ds).to_pandas()
    assert list(out.columns) == ["x", "z", "k", "cat_blue", "cat_green", "cat_red", "y"]
    assert (out[["cat_blue", "cat_green", "cat_red"]].sum(axis=1) == 1).all()
    assert out["cat_red"].tolist() == (frame["cat"] == "red").astype(int).tolist()
    unseen = e.transform_batch(pd.DataFrame({"x": [1.0], "z": [1.0], "k": [0], "cat": ["purple"], "y": ["no"]}))
    assert unseen[["cat_blue", "cat_green", "cat_red"]].values.tolist() == [[0, 0, 0]]


def test_label_encoder(frame, ds):
    e = pp.LabelEncoder("y").fit(ds)
    assert e.stats_ == {"y": ["no", "yes"]}
    out = e.transform(ds).to_pandas()
    assert out["y"].tolist() == (frame["y"] == "yes").astype(int).tolist()
    assert e.inverse_transform_batch(out.head(5))["y"].tolist() == frame["y"].head(5).tolist()
    features = frame.drop(columns=["y"]).head(3)   # prediction input: no label column
    pd.testing.assert_frame_equal(e.transform_batch(features), features)
    with pytest.raises(ValueError, match="not seen in fit.*maybe"):
        e.transform_batch(pd.DataFrame({"y": ["maybe"]}))


def test_concatenator_and_chain(frame, ds):
    chain = pp.Chain(pp.SimpleImputer(["z"]), pp.StandardScaler(["x", "z"]),
                     pp.Concatenator(["x", "z", "k"], output_column_name="features"))
    out = chain.fit_transform(ds)
    assert out.columns() == ["cat", "y", "features"]
    batch = out.take_batch(200, batch_format="numpy")
    assert batch["features"].shape == (200, 3) and batch["features"].dtype == np.float32
    assert chain.preprocessors[1].stats_["z"]["mean"] == pytest.approx(frame["z"].fillna(frame["z"].mean()).mean())
    local = chain.transform_batch(frame)
    np.testing.assert_allclose(np.stack(local["features"].to_numpy()), batch["features"], rtol=1e-6)
    # a fitted chain pickles (into checkpoints) and still applies
    again = pickle.loads(cloudpickle.dumps(chain))
    assert again.fitted
    np.testing.assert_allclose(np.stack(again.transform_batch(frame)["features"].to_numpy()), batch["features"],
                               rtol=1e-6)
    everything = pp.Concatenator(exclude=["cat", "y"]).transform(ds).take_batch(3)
    assert everything["concat_out"].shape == (3, 3)


def test_errors_are_clear_and_cluster_keeps_serving(frame, ds):
    with pytest.raises(TypeError, match="expects a fabric.ml Dataset.*from_pandas"):
        pp.StandardScaler(["x"]).fit(frame)
    with pytest.raises(TypeError, match="expects a fabric.ml Dataset"):
        pp.Chain(pp.StandardScaler(["x"])).fit([1, 2])
    with pytest.raises(pp.PreprocessorNotFittedError, match="call fit"):
        pp.StandardScaler(["x"]).transform(ds)
    with pytest.raises(pp.PreprocessorNotFittedError):
        pp.Chain(pp.MinMaxScaler(["x"])).transform_batch(frame)
    with pytest.raises(ValueError, match=r"no column\(s\) 'nope'.*'x', 'z'"):
        pp.StandardScaler(["nope"]).fit(ds)
    with pytest.raises(ValueError, match="strategy must be one of"):
        pp.SimpleImputer(["z"], strategy="median")
    with pytest.raises(ValueError, match="fill_value"):
        pp.SimpleImputer(["z"], strategy="constant")
    with pytest.raises(TypeError, match="columns"):
        pp.StandardScaler([])
    with pytest.raises(TypeError, match="transform_batch.*DataFrame"):
        pp.StandardScaler(["x"]).fit(ds).transform_batch(42)
    with pytest.raises(TypeError, match="Chain takes preprocessors"):
        pp.Chain("scale")
    # still serving
    assert pp.MinMaxScaler(["k"]).fit(ds).stats_["k"] == {"min": 0.0, "max": 3.0}
    assert fabric.is_initialized()
