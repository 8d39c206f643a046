"""Fold fitted preprocessors into the exported graph, so ``model.onnx`` alone turns raw feature
columns into predictions.

Each raw column becomes a graph input of its own, named by the column, shape ``[N]`` and the
sample's dtype. Numeric columns are cast to double and every statistic is applied in double, as
pandas does, then the features are cast to float32 once, in the model's column order: trees
compare against float32 thresholds, so computing the scaling in float32 would move values that
sit near a split across it.

Steps and their ONNX form (the preprocessors' public ``stats_``):
StandardScaler (x - mean) / std, MinMaxScaler (x - min) / (max - min), SimpleImputer
Where(IsNaN(x), fill, x), OneHotEncoder Equal per category (numbers) or ai.onnx.ml
OneHotEncoder (strings), Concatenator Concat, Chain in order; LabelEncoder acts on the label and
is skipped. Anything else is not folded: the export then keeps ``preprocessor.pkl`` and
OnnxPredictor applies it in Python (the checkpoint says so: ``preprocessor_folded`` false).
"""
from __future__ import annotations

import numpy as np

from .._deps import need

PREFIX = "fabric_pre/"


class NotFoldable(Exception):
    """This preprocessor has no ONNX form here (the reason is the message)."""


def onnx_type(dtype) -> int:
    onnx = need("onnx", "onnx")
    T = onnx.TensorProto
    dtype = np.dtype(dtype) if not str(dtype).startswith(("string", "str")) else np.dtype(object)
    if dtype == np.float64:
        return T.DOUBLE
    if dtype == np.float32:
        return T.FLOAT
    if dtype.kind in "iu":
        return {1: T.INT8, 2: T.INT16, 4: T.INT32, 8: T.INT64}[dtype.itemsize] if dtype.kind == "i" else \
            {1: T.UINT8, 2: T.UINT16, 4: T.UINT32, 8: T.UINT64}[dtype.itemsize]
    if dtype == np.bool_:
        return T.BOOL
    if dtype.kind in "OUS":
        return T.STRING
    raise NotFoldable(f"column dtype {dtype} has no ONNX input type")


def steps_of(preprocessor) -> list:
    if preprocessor is None:
        return []
    if type(preprocessor).__name__ == "Chain":
        out = []
        for p in preprocessor.preprocessors:
            out.extend(steps_of(p))
        return out
    return [preprocessor]


class _Graph:
    def __init__(self, raw_dtypes: dict):
        self.onnx = need("onnx", "onnx")
        self.raw = raw_dtypes          # raw column -> numpy/pandas dtype
        self.nodes, self.inits, self.inputs = [], [], {}
        self.cols: dict[str, tuple[str, int, str]] = {}   # column -> (tensor, width, "num" | "str")
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{PREFIX}{hint}_{self.n}"

    def const(self, value, dtype=np.float64) -> str:
        name = self.name("c")
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op, inputs, hint, domain="", **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def get(self, col: str) -> tuple[str, int, str]:
        if col in self.cols:
            return self.cols[col]
        if col not in self.raw:
            raise NotFoldable(f"column {col!r} is neither a raw column nor made by an earlier step")
        T = self.onnx.TensorProto
        t = onnx_type(self.raw[col])
        self.inputs[col] = self.onnx.helper.make_tensor_value_info(col, t, [None])
        col2 = self.node("Reshape", [col, self.const([-1, 1], np.int64)], "col")
        if t == T.STRING:
            v = (col2, 1, "str")
        else:
            v = (self.node("Cast", [col2], "dbl", to=T.DOUBLE) if t != T.DOUBLE else col2, 1, "num")
        self.cols[col] = v
        return v

    def num(self, col: str, step: str) -> str:
        t, width, kind = self.get(col)
        if kind != "num":
            raise NotFoldable(f"{step} on the string column {col!r}")
        return t

    # --- the steps ---------------------------------------------------------------------
    def apply(self, p) -> None:
        kind = type(p).__name__
        stats = getattr(p, "stats_", None)
        if kind == "StandardScaler":
            for col, s in stats.items():
                x = self.num(col, kind)
                std = float(s["std"]) or 1.0
                if not np.isfinite(std):
                    std = 1.0
                y = self.node("Div", [self.node("Sub", [x, self.const(float(s["mean"]))], "sub"), self.const(std)], "div")
                self.cols[col] = (y, 1, "num")
        elif kind == "MinMaxScaler":
            for col, s in stats.items():
                x = self.num(col, kind)
                span = float(s["max"]) - float(s["min"])
                span = span if span and np.isfinite(span) else 1.0
                y = self.node("Div", [self.node("Sub", [x, self.const(float(s["min"]))], "sub"), self.const(span)], "div")
                self.cols[col] = (y, 1, "num")
        elif kind == "SimpleImputer":
            for col, fill in stats.items():
                if fill is None:
                    continue
                if isinstance(fill, str):
                    raise NotFoldable(f"SimpleImputer with a string fill for {col!r}")
                x = self.num(col, kind)
                y = self.node("Where", [self.node("IsNaN", [x], "nan"), self.const(float(fill)), x], "fill")
                self.cols[col] = (y, 1, "num")
        elif kind == "OneHotEncoder":
            for col, cats in stats.items():
                t, _, ck = self.get(col)
                del self.cols[col]
                if ck == "str":
                    if not all(isinstance(c, str) for c in cats):
                        raise NotFoldable(f"OneHotEncoder categories of {col!r} mix strings and others")
                    hot = self.node("OneHotEncoder", [t], "onehot", domain="ai.onnx.ml",
                                    cats_strings=list(cats), zeros=1)
                    flat = self.node("Cast", [self.node("Reshape", [hot, self.const([-1, len(cats)], np.int64)], "flat")],
                                     "dbl", to=self.onnx.TensorProto.DOUBLE)
                    for k, c in enumerate(cats):
                        sl = self.node("Slice", [flat, self.const([k], np.int64), self.const([k + 1], np.int64),
                                                 self.const([1], np.int64)], "slice")
                        self.cols[f"{col}_{c}"] = (sl, 1, "num")
                else:
                    for c in cats:
                        if isinstance(c, str) or c is None:
                            raise NotFoldable(f"OneHotEncoder category {c!r} of the numeric column {col!r}")
                        eq = self.node("Equal", [t, self.const(float(c))], "eq")
                        self.cols[f"{col}_{c}"] = (self.node("Cast", [eq], "hot", to=self.onnx.TensorProto.DOUBLE), 1, "num")
        elif kind == "LabelEncoder":
            pass  # acts on the label column, which the model does not take
        elif kind == "Concatenator":
            out = getattr(p, "output_column_name", "concat_out")
            exclude = set(getattr(p, "exclude", None) or ())
            cols = [c for c in (list(p.columns) if getattr(p, "columns", None) else self.order) if c not in exclude]
            parts = [self.num(c, kind) for c in cols]
            width = sum(self.cols[c][1] for c in cols)
            y = self.node("Concat", parts, "concat", axis=1) if len(parts) > 1 else parts[0]
            for c in cols:
                self.cols.pop(c, None)
            self.cols[out] = (y, width, "num")
        else:
            raise NotFoldable(f"{kind} has no ONNX form in fabric's export")

    def features(self, columns: list[str]) -> str:
        parts = [self.num(c, "the model input") for c in columns]
        x = self.node("Concat", parts, "features", axis=1) if len(parts) > 1 else parts[0]
        return x


def frame_to_matrix(df, columns) -> np.ndarray:
    """The model's float32 input from a (preprocessed) DataFrame: vector columns expand in place."""
    parts = []
    for c in columns:
        v = df[c].to_numpy()
        if v.dtype == object and len(v) and isinstance(v[0], (list, tuple, np.ndarray)):
            parts.append(np.stack(v).astype(np.float64, copy=False))  # one copy, not one per row
        else:
            parts.append(np.asarray(v, dtype=np.float64).reshape(len(v), -1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def fold(model, preprocessor, raw, feature_columns: list[str] | None, label_column: str | None):
    """Prepend raw columns -> features to ``model`` (whose input is "input" [N, F] float32).

    ``raw`` is a pandas DataFrame of raw sample rows: its dtypes type the inputs, and each
    step's real ``transform_batch`` on it gives the column order the next step sees.
    Returns (the model, changed in place; the feature column names used)."""
    onnx = need("onnx", "onnx")
    raw_cols = [c for c in raw.columns if c != label_column]
    g = _Graph({c: raw[c].dtype for c in raw_cols})
    df = raw
    g.order = list(raw.columns)
    for step in steps_of(preprocessor):
        if type(step).__name__ == "LabelEncoder":
            df = step.transform_batch(df)
            continue
        g.apply(step)
        df = step.transform_batch(df)
        g.order = list(df.columns)
    if feature_columns is None:
        feature_columns = [c for c in df.columns if c != label_column]
    x = g.features(list(feature_columns))
    final = g.node("Cast", [x], "float", to=onnx.TensorProto.FLOAT)

    graph = model.graph
    if [i.name for i in graph.input] != ["input"]:
        raise NotFoldable(f"the model's inputs are {[i.name for i in graph.input]}, not one 'input'")
    # the model reads "input": make the last fold node write it, then drop it as a graph input
    g.nodes[-1].output[0] = "input"
    del graph.input[:]
    used = _needed(g.nodes, "input")
    kept = [n for n in g.nodes if id(n) in used]
    consumed = {i for n in kept for i in n.input}
    inputs = [g.inputs[c] for c in raw_cols if c in g.inputs and c in consumed]
    graph.input.extend(inputs)
    new_nodes = kept + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(g.inits)
    _opsets(model)
    return model, list(feature_columns), [i.name for i in inputs]


def _needed(nodes, out: str) -> set:
    by_out = {o: n for n in nodes for o in n.output}
    keep, todo = set(), [out]
    while todo:
        n = by_out.get(todo.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            todo.extend(n.input)
    return keep


def _opsets(model) -> None:
    onnx = need("onnx", "onnx")
    have = {o.domain: o for o in model.opset_import}
    if "" not in have and "ai.onnx" not in have:
        model.opset_import.append(onnx.helper.make_opsetid("", 13))
    elif "" in have and have[""].version < 11:
        have[""].version = 11
    if "ai.onnx.ml" not in have:
        model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 1))
