"""``ResultGrid``: the outcome of a sweep, one ``ml.Result`` per trial (Ray Tune's names).

Results are built on first access, and each trial's metrics dataframe only when asked for, so a
sweep of thousands of trials returns at once.
"""
from __future__ import annotations

import math

from .trial import ERROR, STOPPED, TERMINATED, Trial

_SCOPES = ("last", "avg", "all", "last-5-avg", "last-10-avg")


class ResultGrid:
    def __init__(self, trials: list[Trial], metric: str | None = None, mode: str | None = None,
                 experiment_path: str = ""):
        self._trials = list(trials)
        self._metric, self._mode = metric, mode
        self.experiment_path = experiment_path
        self._results: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._trials)

    def __getitem__(self, i: int):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"ResultGrid indices are whole numbers, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"ResultGrid index {i} out of range ({len(self)} trials)")
        i %= len(self)
        r = self._results.get(i)
        if r is None:
            r = self._results[i] = _to_result(self._trials[i])
        return r

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self):
        return f"<ResultGrid {len(self)} trials, {self.num_errors} errors>"

    @property
    def trials(self) -> list[Trial]:
        return list(self._trials)

    @property
    def errors(self) -> list[BaseException]:
        """The exceptions of the trials that raised (each with its worker traceback)."""
        return [t.error for t in self._trials if t.status == ERROR and t.error is not None]

    @property
    def num_errors(self) -> int:
        return sum(1 for t in self._trials if t.status == ERROR)

    @property
    def num_terminated(self) -> int:
        return sum(1 for t in self._trials if t.status in (TERMINATED, STOPPED))

    def _reported_keys(self) -> set:
        keys = set()
        for t in self._trials:
            for r in t.history:
                keys.update(r)
        return keys

    def get_best_result(self, metric: str | None = None, mode: str | None = None, scope: str = "last",
                        filter_nan_and_inf: bool = True):
        """The Result of the best trial by ``metric`` (``mode`` min or max).

        ``scope``: ``"last"`` (each trial's last report), ``"avg"``, ``"last-5-avg"``,
        ``"last-10-avg"`` (means over reports) or ``"all"`` (each trial's best report)."""
        metric = metric or self._metric
        mode = mode or self._mode
        if not metric or not mode:
            raise ValueError("get_best_result() needs a metric and a mode: pass them here or set them in "
                             "tune.TuneConfig(metric=..., mode=...)")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(_SCOPES)}, got {scope!r}")
        if not self._trials:
            raise ValueError("get_best_result(): the sweep has no trials")
        keys = self._reported_keys()
        if metric not in keys:
            raise KeyError(f"get_best_result(): no trial reported the metric {metric!r}; reported metrics: "
                           f"{', '.join(sorted(k for k in keys if not k.startswith('_'))) or 'none'}")
        sign = 1.0 if mode == "max" else -1.0
        best, best_score = None, -math.inf
        for i, t in enumerate(self._trials):
            vals = [float(r[metric]) for r in t.history if metric in r]
            if filter_nan_and_inf:
                vals = [v for v in vals if math.isfinite(v)]
            if not vals:
                continue
            if scope == "last":
                v = vals[-1]
            elif scope == "all":
                v = max(vals) if mode == "max" else min(vals)
            else:
                tail = vals if scope == "avg" else vals[-int(scope.split("-")[1]):]
                v = sum(tail) / len(tail)
            if sign * v > best_score:
                best, best_score = i, sign * v
        if best is None:
            raise ValueError(f"get_best_result(): no trial has a finite value of {metric!r}")
        return self[best]

    def get_dataframe(self, filter_metric: str | None = None, filter_mode: str | None = None):
        """A pandas DataFrame, one row per trial: its last (or best, with ``filter_metric``)
        report's metrics, ``config/...`` columns, ``trial_id``, ``status``, ``training_iteration``,
        ``error``."""
        from fabric.ml._deps import need

        from .search import flatten

        pd = need("pandas", "ml", "ResultGrid.get_dataframe()")
        if filter_mode not in (None, "min", "max"):
            raise ValueError(f"filter_mode must be 'min' or 'max', got {filter_mode!r}")
        rows = []
        for t in self._trials:
            r = t.last_result
            if filter_metric:
                vals = [x for x in t.history if filter_metric in x]
                if vals:
                    pick = max if (filter_mode or self._mode) == "max" else min
                    r = pick(vals, key=lambda x: x[filter_metric])
            row = {k: v for k, v in r.items() if not k.startswith("_")}
            row.update({"trial_id": t.trial_id, "status": t.status,
                        "training_iteration": r.get("training_iteration", 0),
                        "error": (t.error_text.strip().splitlines() or [""])[-1] if t.status == ERROR else None,
                        "path": t.path})
            row.update({f"config/{k}": v for k, v in flatten(t.config).items()})
            rows.append(row)
        return pd.DataFrame(rows)


def _to_result(t: Trial):
    from fabric.ml.result import Result

    ckpt = None
    if t.checkpoint:
        from fabric.ml.checkpoint import Checkpoint

        ckpt = Checkpoint.from_directory(t.checkpoint)
    metrics = {k: v for k, v in t.last_result.items() if not k.startswith("_")}
    try:
        import pandas as pd

        frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in t.history])
    except ImportError:  # pandas is fabric[ml]'s; without it the reports stay a list of dicts
        frame = list(t.history)
    return Result(metrics=metrics, checkpoint=ckpt, error=t.error, path=t.path, metrics_dataframe=frame,
                  best_checkpoints=[(ckpt, metrics)] if ckpt else [], config=t.config)
