"""Searchers: where each trial's config comes from.

A searcher is small on purpose, so others are easy to add (subclass ``Searcher``):

- ``setup(param_space, metric, mode, num_samples)``: once, before the first suggestion;
- ``suggest(trial_id) -> dict | None | FINISHED``: the next config; ``None`` means "not now"
  (e.g. wait for results), ``FINISHED`` means no more trials;
- ``on_trial_result(trial_id, result) -> bool``: every report; True asks to stop the trial
  (pruning);
- ``on_trial_complete(trial_id, result, error=False, pruned=False)``: once per trial.

Pure code: no cluster, no clock.
"""
from __future__ import annotations

import random

from . import search as S

FINISHED = "FINISHED"


class Searcher:
    metric: str | None = None
    mode: str | None = None

    def setup(self, param_space: dict, metric: str | None, mode: str | None, num_samples: int) -> None:
        self.param_space, self.num_samples = param_space, num_samples
        self.metric = getattr(self, "_metric", None) or metric
        self.mode = getattr(self, "_mode", None) or mode

    def suggest(self, trial_id: str):
        raise NotImplementedError

    def on_trial_result(self, trial_id: str, result: dict) -> bool:
        return False

    def on_trial_complete(self, trial_id: str, result: dict | None, error: bool = False, pruned: bool = False) -> None:
        pass

    def total(self) -> int | None:
        """How many trials this searcher will make, when known (the live table's denominator)."""
        return None


class BasicVariantGenerator(Searcher):
    """Random search and grid search (the default): each grid point of ``param_space``
    ``num_samples`` times, the other samplers drawn afresh for every trial."""

    def __init__(self, random_state: int | None = None, seed: int | None = None):
        self.rng = random.Random(seed if seed is not None else random_state)

    def setup(self, param_space, metric, mode, num_samples):
        super().setup(param_space, metric, mode, num_samples)
        self.points = S.grid_points(param_space)
        self.i = 0

    def total(self):
        return len(self.points) * self.num_samples

    def suggest(self, trial_id):
        if self.i >= self.total():
            return FINISHED
        point = self.points[self.i % len(self.points)]
        self.i += 1
        return S.resolve(self.param_space, self.rng, point)

    def skip(self, n: int) -> None:
        """Advance past ``n`` suggestions already made (restore), drawing the same random numbers."""
        for _ in range(n):
            self.suggest("")


class OptunaSearch(Searcher):
    """Optuna's samplers (TPE by default) through its ask-and-tell interface.

    Every report goes to Optuna as an intermediate value (``trial.report(value, step)``), so its
    pruner (``MedianPruner`` unless given) can stop a trial early; the final result is told
    (``study.tell``) when the trial ends. ``grid_search`` and ``randn`` have no Optuna form: use
    ``tune.choice`` and ``tune.uniform``."""

    def __init__(self, space: dict | None = None, metric: str | None = None, mode: str | None = None,
                 sampler=None, seed: int | None = None, pruner=None, study_name: str | None = None):
        if mode not in (None, "min", "max"):
            raise ValueError(f"OptunaSearch: mode must be 'min' or 'max', got {mode!r}")
        self._space, self._metric, self._mode = space, metric, mode
        self._sampler, self._seed, self._pruner, self._study_name = sampler, seed, pruner, study_name
        self.trials: dict = {}
        self.made = 0

    def __getstate__(self):  # the experiment state keeps the settings; a restore sets up a new study
        keep = ("_space", "_metric", "_mode", "_sampler", "_seed", "_pruner", "_study_name")
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"trials": {}, "made": 0}

    def add_evaluated(self, config: dict, result: dict) -> None:
        """Tell the study about a trial finished before a restore."""
        if not result or self.metric not in result:
            return
        params, dists = {}, {}
        for path, name, d in self.params:
            try:
                v = S.get_path(config, path)
            except (KeyError, IndexError, TypeError):
                return
            if isinstance(d, S.Float):
                dists[name] = self.optuna.distributions.FloatDistribution(d.lower, d.upper, log=d.log)
            elif isinstance(d, S.Integer):
                dists[name] = self.optuna.distributions.IntDistribution(d.lower, d.high, log=d.log,
                                                                        step=1 if d.log else d.q)
            elif isinstance(d, S.Categorical):
                if v not in d.categories:
                    return
                simple = all(c is None or isinstance(c, (bool, int, float, str)) for c in d.categories)
                choices = d.categories if simple else list(range(len(d.categories)))
                v = v if simple else d.categories.index(v)
                dists[name] = self.optuna.distributions.CategoricalDistribution(choices)
            params[name] = v
        self.study.add_trial(self.optuna.trial.create_trial(params=params, distributions=dists,
                                                            value=float(result[self.metric])))
        self.made += 1

    def setup(self, param_space, metric, mode, num_samples):
        from fabric.ml._deps import need

        optuna = need("optuna", "tune", "tune.OptunaSearch")
        super().setup(self._space or param_space, metric, mode, num_samples)
        if not self.metric or not self.mode:
            raise ValueError("OptunaSearch needs a metric and a mode: pass metric='loss', mode='min' to it or to "
                             "tune.TuneConfig")
        self.params = []
        for path, v in S.leaves(self.param_space):
            name = "/".join(str(p) for p in path)
            if S._is_grid(v):
                raise S.SearchSpaceError(f"OptunaSearch cannot search the grid_search at {name!r}; use "
                                         f"tune.choice({S._grid_values(v)!r}) instead")
            if isinstance(v, S.Normal):
                raise S.SearchSpaceError(f"OptunaSearch has no normal distribution for {name!r} (tune.randn); "
                                         f"use tune.uniform or tune.loguniform")
            if isinstance(v, S.Domain) and not isinstance(v, S.Function):
                self.params.append((path, name, v))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = self._sampler or optuna.samplers.TPESampler(seed=self._seed)
        pruner = self._pruner if self._pruner is not None else optuna.pruners.MedianPruner()
        self.optuna = optuna
        self.study = optuna.create_study(direction="minimize" if self.mode == "min" else "maximize",
                                         sampler=sampler, pruner=pruner, study_name=self._study_name)

    def total(self):
        return self.num_samples

    def suggest(self, trial_id):
        if self.made >= self.num_samples:
            return FINISHED
        ot = self.study.ask()
        fixed = {}
        for path, name, d in self.params:
            if isinstance(d, S.Float):
                step = d.q if d.q is not None and not d.log else None
                fixed[path] = ot.suggest_float(name, d.lower, d.upper, log=d.log, step=step)
            elif isinstance(d, S.Integer):
                fixed[path] = ot.suggest_int(name, d.lower, d.high, step=d.q if not d.log else 1, log=d.log)
            elif isinstance(d, S.Categorical):
                simple = all(c is None or isinstance(c, (bool, int, float, str)) for c in d.categories)
                if simple:
                    fixed[path] = ot.suggest_categorical(name, d.categories)
                else:  # Optuna stores only plain values: choose an index
                    fixed[path] = d.categories[ot.suggest_categorical(name, list(range(len(d.categories))))]
            else:
                raise S.SearchSpaceError(f"OptunaSearch cannot search {name!r} ({d!r})")
        self.trials[trial_id] = [ot, 0]
        self.made += 1
        return S.resolve(self.param_space, random.Random(ot.number), fixed)

    def on_trial_result(self, trial_id, result):
        entry = self.trials.get(trial_id)
        if entry is None or self.metric not in result:
            return False
        ot = entry[0]
        step = int(result.get("training_iteration", entry[1] + 1))
        entry[1] = step
        ot.report(float(result[self.metric]), step)
        return bool(ot.should_prune())

    def on_trial_complete(self, trial_id, result, error=False, pruned=False):
        entry = self.trials.pop(trial_id, None)
        if entry is None:
            return
        ts = self.optuna.trial.TrialState
        if error or not result or self.metric not in result:
            self.study.tell(entry[0], state=ts.FAIL)
        elif pruned:
            self.study.tell(entry[0], state=ts.PRUNED)
        else:
            self.study.tell(entry[0], float(result[self.metric]))
