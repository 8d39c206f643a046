"""Preprocessors: fit statistics on a Dataset on the cluster, apply them to Datasets and batches.

``fit`` computes per-block partial statistics in the per-block calls (one small result per
block: counts, sums, minima, category sets) and combines them in the driver, so no data is
pulled in. ``transform`` is a lazy ``map_batches`` (fused with the rest of the plan);
``transform_batch`` applies the same fitted state to a pandas DataFrame, which is what
predictors and serving do. The fitted state is public (``stats_``) so ONNX export can fold it
into the graph; a fitted preprocessor pickles into a checkpoint.
"""
from __future__ import annotations

import math

from ._deps import need

__all__ = ["Preprocessor", "PreprocessorNotFittedError", "StandardScaler", "MinMaxScaler", "OneHotEncoder",
           "LabelEncoder", "SimpleImputer", "Concatenator", "Chain"]


class PreprocessorNotFittedError(RuntimeError):
    """``transform`` was called on a preprocessor that needs ``fit`` first."""


def _dataset_type():
    from .data import Dataset
    return Dataset


def _columns_arg(columns, where):
    if isinstance(columns, str):
        columns = [columns]
    try:
        columns = list(columns)
    except TypeError:
        raise TypeError(f"{where}: columns must be a list of column names, got {type(columns).__name__}") from None
    if not columns or not all(isinstance(c, str) for c in columns):
        raise TypeError(f"{where}: columns must be a non-empty list of column names (str), got {columns!r}")
    return columns


def _check_in(where, cols, have):
    missing = [c for c in cols if c not in have]
    if missing:
        raise ValueError(f"{where}: no column(s) {', '.join(map(repr, missing))}; the columns are "
                         f"{', '.join(map(repr, list(have)))}")


class Preprocessor:
    """Base: ``fit(ds) -> self``, ``transform(ds) -> Dataset``, ``fit_transform``, ``transform_batch(df)``."""

    _stateful = True

    def __init__(self):
        self.stats_ = None

    @property
    def fitted(self) -> bool:
        return not self._stateful or self.stats_ is not None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({args})"

    def fit(self, ds) -> "Preprocessor":
        """Compute the statistics on the cluster (one partial per block) and keep them."""
        if not isinstance(ds, _dataset_type()):
            raise TypeError(f"{type(self).__name__}.fit() expects a fabric.ml Dataset, got "
                            f"{type(ds).__module__}.{type(ds).__qualname__}"
                            + ("; wrap it with ml.from_pandas(df)" if hasattr(ds, "iloc") else ""))
        if self._stateful:
            where = f"{type(self).__name__}.fit"
            partial = self._partial
            cols = self._fit_columns()

            def stats(table, _cols=cols, _where=where, _partial=partial):
                _check_in(_where, _cols, table.column_names)
                return _partial(table)

            partials = ds._aggregate(stats)
            self.stats_ = self._combine(partials)
        return self

    def fit_transform(self, ds):
        return self.fit(ds).transform(ds)

    def _check_fitted(self):
        if not self.fitted:
            raise PreprocessorNotFittedError(f"{type(self).__name__} is not fitted: call fit(ds) before "
                                             f"transform()/transform_batch()")

    def transform(self, ds):
        """A lazy Dataset with this transform fused into its per-block calls."""
        if not isinstance(ds, _dataset_type()):
            raise TypeError(f"{type(self).__name__}.transform() expects a fabric.ml Dataset, got "
                            f"{type(ds).__name__}; for a pandas DataFrame use transform_batch(df)")
        self._check_fitted()
        return ds.map_batches(_ApplyBatch(self), batch_format="pyarrow")

    def transform_batch(self, df):
        """This transform on a pandas DataFrame (a copy; the input is not changed)."""
        self._check_fitted()
        pd = need("pandas", "ml")
        if isinstance(df, dict):
            df = pd.DataFrame(df)
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"{type(self).__name__}.transform_batch() expects a pandas DataFrame, got "
                            f"{type(df).__name__}")
        return self._transform_pandas(df.copy())

    def _transform_table(self, table):
        """The transform on an Arrow table (default: through pandas)."""
        pa = need("pyarrow", "ml")
        return pa.Table.from_pandas(self._transform_pandas(table.to_pandas()), preserve_index=False)

    # subclasses
    def _fit_columns(self):
        return self.columns

    def _partial(self, table):
        raise NotImplementedError

    def _combine(self, partials):
        raise NotImplementedError

    def _transform_pandas(self, df):
        raise NotImplementedError


class _ApplyBatch:
    """The picklable per-block function of ``transform``."""

    def __init__(self, p):
        self.p = p
        self.__name__ = type(p).__name__

    def __call__(self, table):
        return self.p._transform_table(table)


def _num(col):
    """A column as a float64 numpy array with NaN for nulls."""
    import numpy as np
    import pyarrow.compute as pc
    c = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    return np.asarray(pc.cast(c, "float64").to_numpy(zero_copy_only=False), dtype=np.float64)


class StandardScaler(Preprocessor):
    """``(x - mean) / std`` per column (population std; a std of 0 is treated as 1).

    ``stats_ = {col: {"mean": float, "std": float}}``."""

    def __init__(self, columns):
        super().__init__()
        self.columns = _columns_arg(columns, "StandardScaler")

    def _partial(self, t):
        import numpy as np
        out = {}
        for c in self.columns:
            x = _num(t[c])
            x = x[~np.isnan(x)]
            n = len(x)
            mean = float(x.mean()) if n else 0.0
            out[c] = (n, mean, float(((x - mean) ** 2).sum()) if n else 0.0)
        return out

    def _combine(self, partials):
        stats = {}
        for c in self.columns:
            n, mean, m2 = 0, 0.0, 0.0
            for p in partials:  # Chan et al.'s pairwise update: stable where sum of squares is not
                nb, mb, m2b = p[c]
                if nb == 0:
                    continue
                tot = n + nb
                d = mb - mean
                mean += d * nb / tot
                m2 += m2b + d * d * n * nb / tot
                n = tot
            std = math.sqrt(m2 / n) if n else 0.0
            stats[c] = {"mean": float(mean), "std": float(std)}
        return stats

    def _transform_pandas(self, df):
        _check_in("StandardScaler.transform", self.columns, df.columns)
        for c in self.columns:
            s = self.stats_[c]
            std = s["std"] or 1.0
            df[c] = (df[c] - s["mean"]) / std
        return df

    def _transform_table(self, t):
        import pyarrow.compute as pc
        _check_in("StandardScaler.transform", self.columns, t.column_names)
        for c in self.columns:
            s = self.stats_[c]
            col = t[c]
            if not (col.type.equals("float32") or col.type.equals("float64")):
                col = pc.cast(col, "float64")
            std = s["std"] or 1.0
            new = pc.divide(pc.subtract(col, s["mean"]), std)
            t = t.set_column(t.column_names.index(c), c, pc.cast(new, col.type))
        return t


class MinMaxScaler(Preprocessor):
    """``(x - min) / (max - min)`` per column (a range of 0 is treated as 1).

    ``stats_ = {col: {"min": float, "max": float}}``."""

    def __init__(self, columns):
        super().__init__()
        self.columns = _columns_arg(columns, "MinMaxScaler")

    def _partial(self, t):
        import numpy as np
        out = {}
        for c in self.columns:
            x = _num(t[c])
            x = x[~np.isnan(x)]
            out[c] = (float(x.min()), float(x.max())) if len(x) else None
        return out

    def _combine(self, partials):
        stats = {}
        for c in self.columns:
            vals = [p[c] for p in partials if p[c] is not None]
            lo = min((v[0] for v in vals), default=float("nan"))
            hi = max((v[1] for v in vals), default=float("nan"))
            stats[c] = {"min": lo, "max": hi}
        return stats

    def _transform_pandas(self, df):
        _check_in("MinMaxScaler.transform", self.columns, df.columns)
        for c in self.columns:
            s = self.stats_[c]
            rng = (s["max"] - s["min"]) or 1.0
            df[c] = (df[c] - s["min"]) / rng
        return df


class SimpleImputer(Preprocessor):
    """Fill missing values: with the column's mean, its most frequent value, or ``fill_value``.

    ``stats_ = {col: fill}``."""

    STRATEGIES = ("mean", "most_frequent", "constant")

    def __init__(self, columns, strategy: str = "mean", fill_value=None):
        super().__init__()
        self.columns = _columns_arg(columns, "SimpleImputer")
        if strategy not in self.STRATEGIES:
            raise ValueError(f"SimpleImputer strategy must be one of {', '.join(map(repr, self.STRATEGIES))}, "
                             f"got {strategy!r}")
        if strategy == "constant" and fill_value is None:
            raise ValueError("SimpleImputer(strategy='constant') needs a fill_value")
        self.strategy, self.fill_value = strategy, fill_value
        if strategy == "constant":
            self.stats_ = {c: fill_value for c in self.columns}

    def fit(self, ds):
        if self.strategy == "constant":
            if not isinstance(ds, _dataset_type()):
                return super().fit(ds)  # the type error
            return self
        return super().fit(ds)

    def _partial(self, t):
        import pyarrow.compute as pc
        out = {}
        for c in self.columns:
            col = t[c]
            if self.strategy == "mean":
                x = _num(col)
                import numpy as np
                x = x[~np.isnan(x)]
                out[c] = (len(x), float(x.sum()))
            else:
                vc = pc.value_counts(col.drop_null() if hasattr(col, "drop_null") else col)
                out[c] = {v["values"]: v["counts"] for v in vc.to_pylist() if v["values"] is not None}
        return out

    def _combine(self, partials):
        stats = {}
        for c in self.columns:
            if self.strategy == "mean":
                n = sum(p[c][0] for p in partials)
                s = sum(p[c][1] for p in partials)
                stats[c] = s / n if n else float("nan")
            else:
                counts = {}
                for p in partials:
                    for v, k in p[c].items():
                        counts[v] = counts.get(v, 0) + k
                # the most frequent; ties go to the smallest value, so the result does not depend on blocks
                stats[c] = min(counts.items(), key=lambda kv: (-kv[1], _sort_key(kv[0])))[0] if counts else None
        return stats

    def _transform_pandas(self, df):
        _check_in("SimpleImputer.transform", self.columns, df.columns)
        for c in self.columns:
            fill = self.stats_[c]
            if fill is not None:
                df[c] = df[c].fillna(fill)
        return df


def _sort_key(v):
    return (type(v).__name__, v)


class OneHotEncoder(Preprocessor):
    """One column ``f"{col}_{category}"`` (0/1) per category seen in ``fit``, replacing ``col``
    in place; a category not seen in fit (or a null) is all zeros.

    ``stats_ = {col: [category, ...]}`` (sorted)."""

    def __init__(self, columns):
        super().__init__()
        self.columns = _columns_arg(columns, "OneHotEncoder")

    def _partial(self, t):
        import pyarrow.compute as pc
        return {c: [v for v in pc.unique(t[c]).to_pylist() if v is not None] for c in self.columns}

    def _combine(self, partials):
        return {c: sorted({v for p in partials for v in p[c]}, key=_sort_key) for c in self.columns}

    def _transform_pandas(self, df):
        import numpy as np
        pd = need("pandas", "ml")
        _check_in("OneHotEncoder.transform", self.columns, df.columns)
        for c in self.columns:
            cats = self.stats_[c]
            values = df[c]
            new = {f"{c}_{cat}": (values == cat).to_numpy(dtype=bool, na_value=False).astype(np.int64)
                   for cat in cats}
            pos = list(df.columns).index(c)
            left, right = df.iloc[:, :pos], df.iloc[:, pos + 1:]
            df = pd.concat([left, pd.DataFrame(new, index=df.index), right], axis=1)
        return df


class LabelEncoder(Preprocessor):
    """The label column's values as their index in the sorted classes seen in ``fit``
    (``inverse_transform_batch`` maps back). A batch without the label column (prediction
    input) passes through.

    ``stats_ = {label_column: [class, ...]}``."""

    def __init__(self, label_column: str):
        super().__init__()
        if not isinstance(label_column, str):
            raise TypeError(f"LabelEncoder needs the label column's name (str), got {type(label_column).__name__}")
        self.label_column = label_column

    def _fit_columns(self):
        return [self.label_column]

    def _partial(self, t):
        import pyarrow.compute as pc
        return [v for v in pc.unique(t[self.label_column]).to_pylist() if v is not None]

    def _combine(self, partials):
        return {self.label_column: sorted({v for p in partials for v in p}, key=_sort_key)}

    def _transform_pandas(self, df):
        c = self.label_column
        if c not in df.columns:
            return df
        classes = self.stats_[c]
        index = {v: i for i, v in enumerate(classes)}
        unseen = sorted({v for v in df[c].dropna().unique() if v not in index}, key=_sort_key)
        if unseen:
            raise ValueError(f"LabelEncoder: {c!r} has value(s) not seen in fit: {unseen[:10]}; the classes "
                             f"are {classes[:20]}")
        df[c] = df[c].map(index)
        return df

    def inverse_transform_batch(self, df):
        self._check_fitted()
        df = df.copy()
        classes = self.stats_[self.label_column]
        df[self.label_column] = df[self.label_column].map(lambda i: classes[int(i)])
        return df


class Concatenator(Preprocessor):
    """Pack columns into one column of fixed-size lists (``output_column_name``) of ``dtype``;
    a 2-D array in numpy batches. ``columns=None``: every column but ``exclude``. Stateless."""

    _stateful = False

    def __init__(self, columns=None, output_column_name: str = "concat_out", exclude=None, dtype=None,
                 raise_if_missing: bool = True):
        super().__init__()
        import numpy as np
        self.columns = None if columns is None else _columns_arg(columns, "Concatenator")
        self.exclude = [] if exclude is None else _columns_arg(exclude, "Concatenator(exclude=...)")
        self.output_column_name = output_column_name
        self.dtype = np.dtype(np.float32 if dtype is None else dtype)
        self.raise_if_missing = raise_if_missing

    def _cols(self, have):
        if self.columns is None:
            return [c for c in have if c not in self.exclude]
        _check_in("Concatenator", self.columns, have)
        return [c for c in self.columns if c not in self.exclude]

    def _matrix(self, getcol, cols, n):
        import numpy as np
        m = np.empty((n, len(cols)), dtype=self.dtype)
        for j, c in enumerate(cols):
            m[:, j] = getcol(c)
        return m

    def _transform_pandas(self, df):
        cols = self._cols(list(df.columns))
        m = self._matrix(lambda c: df[c].to_numpy(), cols, len(df))
        rest = df.drop(columns=cols)
        rest[self.output_column_name] = list(m)
        return rest

    def _transform_table(self, t):
        import pyarrow as pa
        cols = self._cols(t.column_names)
        m = self._matrix(lambda c: t[c].to_numpy(), cols, t.num_rows)
        out = t.drop_columns(cols)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), len(cols))
        return out.append_column(self.output_column_name, arr)


class Chain(Preprocessor):
    """Preprocessors applied in order; ``fit`` fits each on the output of the ones before it."""

    def __init__(self, *preprocessors):
        super().__init__()
        for p in preprocessors:
            if not isinstance(p, Preprocessor):
                raise TypeError(f"Chain takes preprocessors, got {type(p).__name__}")
        self.preprocessors = list(preprocessors)

    @property
    def fitted(self) -> bool:
        return all(p.fitted for p in self.preprocessors)

    def fit(self, ds):
        if not isinstance(ds, _dataset_type()):
            return super().fit(ds)
        for i, p in enumerate(self.preprocessors):
            if p._stateful:
                p.fit(ds)
            if i < len(self.preprocessors) - 1:
                ds = p.transform(ds)
        return self

    def transform(self, ds):
        if not isinstance(ds, _dataset_type()):
            return super().transform(ds)
        self._check_fitted()
        for p in self.preprocessors:
            ds = p.transform(ds)
        return ds

    def _check_fitted(self):
        for p in self.preprocessors:
            p._check_fitted()

    def _transform_pandas(self, df):
        for p in self.preprocessors:
            df = p._transform_pandas(df)
        return df

    def _transform_table(self, t):
        for p in self.preprocessors:
            t = p._transform_table(t)
        return t
