"""Trial schedulers: decide, from the results trials report, which go on and which stop.

Pure decision logic, as ``fabric/autoscale/policy.py``: no sockets and no clock. Time reaches a
scheduler only through the results (``training_iteration``, ``time_total_s``, which the tuner
stamps from its own clock), so tests drive them with made-up results and a fake clock.

The interface (``TrialScheduler``) is Ray Tune's, trimmed: ``on_trial_add``,
``on_trial_result -> CONTINUE | STOP | Exploit``, ``on_trial_complete``, ``on_trial_remove``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

CONTINUE = "CONTINUE"
STOP = "STOP"        # stop early (the trial's status: STOPPED)
FINISH = "FINISH"    # the trial used its whole budget (max_t): stop it, status TERMINATED


class MetricNotReported(ValueError):
    """A scheduler or searcher needs a metric the trial's results do not hold."""


@dataclass
class Exploit:
    """PBT's decision: restart this trial with ``config`` from ``donor``'s latest checkpoint."""

    donor: str
    config: dict
    old_config: dict = field(default_factory=dict)


def _check_mode(mode, where):
    if mode not in (None, "min", "max"):
        raise ValueError(f"{where}: mode must be 'min' or 'max', got {mode!r}")


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation, as numpy's default."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class TrialScheduler:
    """Base: holds ``metric``/``mode`` (taken from TuneConfig when not given) and checks results."""

    needs_metric = True
    name = "scheduler"

    def __init__(self, metric: str | None = None, mode: str | None = None, time_attr: str = "training_iteration"):
        _check_mode(mode, type(self).__name__)
        self.metric, self.mode, self.time_attr = metric, mode, time_attr

    def set_search_properties(self, metric: str | None, mode: str | None) -> None:
        """Fill in what the scheduler was not given; raise if it still lacks what it needs."""
        self.metric = self.metric or metric
        self.mode = self.mode or mode
        _check_mode(self.mode, type(self).__name__)
        if self.needs_metric and (not self.metric or not self.mode):
            raise ValueError(f"{type(self).__name__} needs a metric and a mode: pass metric='loss', mode='min' "
                             f"to it or to tune.TuneConfig")

    def _score(self, trial_id: str, result: dict) -> float:
        """The result's metric, signed so that larger is better."""
        if self.metric not in result:
            raise MetricNotReported(
                f"{type(self).__name__} needs the metric {self.metric!r}, but trial {trial_id} reported only "
                f"{sorted(k for k in result if not k.startswith('_'))}; report it with tune.report({{{self.metric!r}: ...}})"
                f" or set another metric")
        if self.time_attr not in result:
            raise MetricNotReported(f"{type(self).__name__} counts time in {self.time_attr!r}, which trial {trial_id}'s "
                                    f"results do not hold")
        v = float(result[self.metric])
        return v if self.mode == "max" else -v

    def on_trial_add(self, trial_id: str, config: dict) -> None:
        pass

    def on_trial_result(self, trial_id: str, result: dict):
        return CONTINUE

    def on_trial_complete(self, trial_id: str, result: dict | None) -> None:
        pass

    def on_trial_remove(self, trial_id: str) -> None:
        pass

    def state(self) -> dict:  # for the experiment state file (restore)
        return {}


class FIFOScheduler(TrialScheduler):
    """Runs every trial to its end (the default)."""

    needs_metric = False


class _Bracket:
    def __init__(self, grace: float, max_t: float, rf: float, s: int):
        self.rf = rf
        self.rungs: list[tuple[float, dict]] = []  # (milestone, {trial: score}), largest first
        k = s
        while grace * rf ** k < max_t:
            self.rungs.append((grace * rf ** k, {}))
            k += 1
        self.rungs.reverse()

    def on_result(self, trial_id, t, score) -> str:
        for milestone, recorded in self.rungs:
            if t < milestone or trial_id in recorded:
                continue
            cutoff = quantile(list(recorded.values()), 1 - 1 / self.rf) if recorded else None
            recorded[trial_id] = score
            if cutoff is not None and score < cutoff:
                return STOP
            break
        return CONTINUE


class ASHAScheduler(TrialScheduler):
    """Asynchronous successive halving (Li et al.; Ray's ``ASHAScheduler``).

    Rungs sit at ``grace_period * reduction_factor**k`` below ``max_t``. A trial reaching a rung
    goes on only if its score is in the top ``1/reduction_factor`` of the scores recorded there so
    far; the first at a rung always goes on. No trial waits for others, so nothing idles."""

    name = "ASHA"

    def __init__(self, time_attr: str = "training_iteration", metric: str | None = None, mode: str | None = None,
                 max_t: float = 100, grace_period: float = 1, reduction_factor: float = 4, brackets: int = 1):
        super().__init__(metric, mode, time_attr)
        for name, v in (("max_t", max_t), ("grace_period", grace_period)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a number above 0, got {v!r}")
        if grace_period > max_t:
            raise ValueError(f"{type(self).__name__}: grace_period ({grace_period}) must not exceed max_t ({max_t})")
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or reduction_factor <= 1:
            raise ValueError(f"{type(self).__name__}: reduction_factor must be above 1, got {reduction_factor!r}")
        if isinstance(brackets, bool) or not isinstance(brackets, int) or brackets < 1:
            raise ValueError(f"{type(self).__name__}: brackets must be a whole number >= 1, got {brackets!r}")
        self.max_t, self.grace_period, self.rf = max_t, grace_period, reduction_factor
        self.brackets = [_Bracket(grace_period, max_t, reduction_factor, s) for s in range(brackets)]
        self.assigned: dict[str, int] = {}
        self._n = 0

    def on_trial_add(self, trial_id, config):
        if trial_id not in self.assigned:
            # Round robin over brackets, as Ray weights them equally by count of trials
            self.assigned[trial_id] = self._n % len(self.brackets)
            self._n += 1

    def on_trial_result(self, trial_id, result):
        score = self._score(trial_id, result)
        t = result[self.time_attr]
        if t >= self.max_t:
            return FINISH
        if trial_id not in self.assigned:
            self.on_trial_add(trial_id, {})
        return self.brackets[self.assigned[trial_id]].on_result(trial_id, t, score)

    def on_trial_complete(self, trial_id, result):
        # A trial that ends before max_t still counts at the rungs it reached (Ray does the same)
        if result is not None and self.metric in result and self.time_attr in result and trial_id in self.assigned:
            self.brackets[self.assigned[trial_id]].on_result(trial_id, result[self.time_attr],
                                                             self._score(trial_id, result))


class HyperBandScheduler(ASHAScheduler):
    """HyperBand's brackets (Li et al. 2018), run asynchronously.

    Bracket ``s`` starts halving at ``grace_period * reduction_factor**s``; trials are spread
    over all ``floor(log_rf(max_t / grace_period)) + 1`` brackets, so some trials get a long run
    before any judgement (HyperBand's hedge against a misleading early metric). Unlike Ray's
    synchronous ``HyperBandScheduler`` no trial is paused waiting for its bracket's others: a
    paused trial holds its resources or must be checkpointed and restarted, and on a small
    cluster the asynchronous form finishes sooner for the same decisions in expectation."""

    name = "HyperBand"

    def __init__(self, time_attr: str = "training_iteration", metric: str | None = None, mode: str | None = None,
                 max_t: float = 81, grace_period: float = 1, reduction_factor: float = 3):
        n = 1
        if isinstance(max_t, (int, float)) and isinstance(grace_period, (int, float)) and \
                isinstance(reduction_factor, (int, float)) and max_t > 0 and grace_period > 0 and reduction_factor > 1 \
                and max_t >= grace_period:
            n = int(math.floor(math.log(max_t / grace_period) / math.log(reduction_factor) + 1e-9)) + 1
        super().__init__(time_attr, metric, mode, max_t, grace_period, reduction_factor, brackets=max(1, n))


class MedianStoppingRule(TrialScheduler):
    """Stops a trial whose best result so far is worse than the median of the other trials'
    running means at the same time (Golovin et al., Google Vizier; Ray's ``MedianStoppingRule``)."""

    name = "MedianStopping"

    def __init__(self, time_attr: str = "time_total_s", metric: str | None = None, mode: str | None = None,
                 grace_period: float = 60.0, min_samples_required: int = 3, min_time_slice: float = 0,
                 hard_stop: bool = True):
        super().__init__(metric, mode, time_attr)
        if isinstance(grace_period, bool) or not isinstance(grace_period, (int, float)) or grace_period < 0:
            raise ValueError(f"MedianStoppingRule: grace_period must be a number >= 0, got {grace_period!r}")
        if isinstance(min_samples_required, bool) or not isinstance(min_samples_required, int) or min_samples_required < 1:
            raise ValueError(f"MedianStoppingRule: min_samples_required must be a whole number >= 1, "
                             f"got {min_samples_required!r}")
        self.grace_period, self.min_samples = grace_period, min_samples_required
        self.min_time_slice, self.hard_stop = min_time_slice, hard_stop
        self.history: dict[str, list[tuple[float, float]]] = {}
        self.last_check: dict[str, float] = {}

    def _mean_until(self, trial_id, t):
        vals = [s for tt, s in self.history.get(trial_id, ()) if tt <= t]
        return sum(vals) / len(vals) if vals else None

    def on_trial_result(self, trial_id, result):
        score = self._score(trial_id, result)
        t = float(result[self.time_attr])
        self.history.setdefault(trial_id, []).append((t, score))
        if t < self.grace_period or t - self.last_check.get(trial_id, -math.inf) < self.min_time_slice:
            return CONTINUE
        self.last_check[trial_id] = t
        others = [m for o in self.history if o != trial_id for m in [self._mean_until(o, t)] if m is not None]
        if len(others) < self.min_samples:
            return CONTINUE
        median = quantile(others, 0.5)
        best = max(s for _, s in self.history[trial_id])
        return STOP if best < median else CONTINUE


class PopulationBasedTraining(TrialScheduler):
    """Population based training (Jaderberg et al. 2017; Ray's ``PopulationBasedTraining``).

    Every ``perturbation_interval`` (in ``time_attr``) a trial in the bottom ``quantile_fraction``
    of the population *exploits*: it restarts from the latest checkpoint of a trial in the top
    fraction, with that trial's config *explored*: each key of ``hyperparam_mutations`` is
    resampled (with ``resample_probability``) or perturbed (numbers times 0.8 or 1.2, a list's
    neighbour). Trials must report checkpoints for the weights to carry over."""

    name = "PBT"

    def __init__(self, time_attr: str = "time_total_s", metric: str | None = None, mode: str | None = None,
                 perturbation_interval: float = 60.0, hyperparam_mutations: dict | None = None,
                 quantile_fraction: float = 0.25, resample_probability: float = 0.25,
                 custom_explore_fn=None, seed: int | None = None):
        super().__init__(metric, mode, time_attr)
        if isinstance(perturbation_interval, bool) or not isinstance(perturbation_interval, (int, float)) \
                or perturbation_interval <= 0:
            raise ValueError(f"PopulationBasedTraining: perturbation_interval must be above 0, "
                             f"got {perturbation_interval!r}")
        if not hyperparam_mutations and custom_explore_fn is None:
            raise ValueError("PopulationBasedTraining needs hyperparam_mutations (a dict of key -> list, sampler "
                             "or function) or a custom_explore_fn")
        if hyperparam_mutations is not None and not isinstance(hyperparam_mutations, dict):
            raise ValueError(f"PopulationBasedTraining: hyperparam_mutations must be a dict, "
                             f"got {type(hyperparam_mutations).__name__}")
        if not 0 < quantile_fraction <= 0.5:
            raise ValueError(f"PopulationBasedTraining: quantile_fraction must be in (0, 0.5], got {quantile_fraction!r}")
        if not 0 <= resample_probability <= 1:
            raise ValueError(f"PopulationBasedTraining: resample_probability must be in [0, 1], "
                             f"got {resample_probability!r}")
        self.interval, self.mutations = perturbation_interval, hyperparam_mutations or {}
        self.qf, self.resample_p, self.custom_explore_fn = quantile_fraction, resample_probability, custom_explore_fn
        self.rng = random.Random(seed)
        self.configs: dict[str, dict] = {}
        self.scores: dict[str, float] = {}
        self.last_perturb: dict[str, float] = {}
        self.num_perturbations = 0

    def on_trial_add(self, trial_id, config):
        self.configs[trial_id] = config
        self.last_perturb.setdefault(trial_id, 0.0)

    def on_trial_result(self, trial_id, result):
        score = self._score(trial_id, result)
        t = float(result[self.time_attr])
        self.scores[trial_id] = score
        if t - self.last_perturb.get(trial_id, 0.0) < self.interval:
            return CONTINUE
        self.last_perturb[trial_id] = t
        lower, upper = self.quantiles()
        if trial_id not in lower or not upper:
            return CONTINUE
        donor = self.rng.choice(upper)
        old = self.configs.get(trial_id, {})
        new = self.explore(self.configs.get(donor, {}))
        self.configs[trial_id] = new
        self.num_perturbations += 1
        return Exploit(donor=donor, config=new, old_config=old)

    def on_trial_remove(self, trial_id):
        self.scores.pop(trial_id, None)

    def on_trial_complete(self, trial_id, result):
        pass  # a finished trial stays a donor

    def quantiles(self) -> tuple[list[str], list[str]]:
        """(bottom, top) trial ids by latest score; empty when fewer than two trials scored."""
        ranked = sorted(self.scores, key=self.scores.get)
        if len(ranked) < 2:
            return [], []
        n = max(1, int(math.ceil(len(ranked) * self.qf)))
        if 2 * n > len(ranked):
            n = len(ranked) // 2
        return ranked[:n], ranked[-n:]

    def explore(self, config: dict) -> dict:
        new = _deep_copy(config)
        self._explore(new, self.mutations)
        if self.custom_explore_fn is not None:
            new = self.custom_explore_fn(new)
        return new

    def _explore(self, cfg: dict, mutations: dict):
        from .search import Domain

        for key, m in mutations.items():
            cur = cfg.get(key)
            if isinstance(m, dict):
                sub = cfg.setdefault(key, {})
                self._explore(sub, m)
            elif isinstance(m, (list, tuple)):
                m = list(m)
                if self.rng.random() < self.resample_p or cur not in m:
                    cfg[key] = self.rng.choice(m)
                else:
                    i = m.index(cur) + self.rng.choice([-1, 1])
                    cfg[key] = m[min(max(i, 0), len(m) - 1)]
            elif isinstance(m, Domain) or callable(m):
                draw = (lambda: m.sample(self.rng)) if isinstance(m, Domain) else m
                if cur is None or self.rng.random() < self.resample_p or not isinstance(cur, (int, float)):
                    cfg[key] = draw()
                else:
                    v = cur * self.rng.choice([0.8, 1.2])
                    cfg[key] = int(v) if isinstance(cur, int) and not isinstance(cur, bool) else v
            else:
                raise ValueError(f"PopulationBasedTraining: hyperparam_mutations[{key!r}] must be a list, a sampler "
                                 f"(tune.uniform, ...), a function or a dict, got {type(m).__name__}")


def _deep_copy(x):
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


AsyncHyperBandScheduler = ASHAScheduler  # Ray's other name for it
