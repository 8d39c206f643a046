"""fabric.ml.tune's pure parts, apart from any cluster: search spaces, schedulers (driven by
made-up results and a fake clock), searchers, ResultGrid and the live view."""
import io
import math
import random

import pytest

from fabric.ml import tune
from fabric.ml.tune import schedulers as SC
from fabric.ml.tune import search as S
from fabric.ml.tune.progress import ProgressView, summary
from fabric.ml.tune.searchers import FINISHED
from fabric.ml.tune.trial import ERROR, RUNNING, STOPPED, TERMINATED, Trial


# ------------------------------------------------------------------ search spaces
def test_samplers_stay_in_bounds_and_quantise():
    rng = random.Random(0)
    for _ in range(500):
        assert 1 <= tune.uniform(1, 2).sample(rng) <= 2
        v = tune.loguniform(1e-4, 1e-1).sample(rng)
        assert 1e-4 <= v <= 1e-1
        assert tune.randint(2, 5).sample(rng) in (2, 3, 4)          # upper excluded
        assert tune.qrandint(0, 10, 5).sample(rng) in (0, 5, 10)    # upper included, multiples of q
        q = tune.quniform(0, 1, 0.25).sample(rng)
        assert q in (0, 0.25, 0.5, 0.75, 1.0)
        assert tune.choice(["a", "b"]).sample(rng) in ("a", "b")
    draws = [tune.randn(10, 0.1).sample(rng) for _ in range(200)]
    assert abs(sum(draws) / len(draws) - 10) < 0.1


def test_log_sampler_covers_decades_evenly():
    rng = random.Random(1)
    draws = [tune.loguniform(1e-4, 1).sample(rng) for _ in range(4000)]
    below = sum(1 for d in draws if d < 1e-2)
    assert 0.4 < below / len(draws) < 0.6  # half the decades, half the draws


@pytest.mark.parametrize("make, words", [
    (lambda: tune.uniform(2, 1), "lower must be below upper"),
    (lambda: tune.uniform(1, 1), "lower must be below upper"),
    (lambda: tune.loguniform(0, 1), "lower > 0"),
    (lambda: tune.loguniform(1e-1, 1e-4), "lower must be below upper"),
    (lambda: tune.randint(5, 2), "swap"),
    (lambda: tune.qrandint(3, 1), "swap"),
    (lambda: tune.quniform(0, 1, 0), "q must be above 0"),
    (lambda: tune.uniform("a", 1), "must be a number"),
    (lambda: tune.uniform(0, math.inf), "finite"),
    (lambda: tune.randint(0.5, 3), "whole number"),
    (lambda: tune.randn(0, -1), "sd must be above 0"),
    (lambda: tune.choice([]), "at least one option"),
    (lambda: tune.choice("abc"), "list of options"),
    (lambda: tune.grid_search([]), "at least one value"),
    (lambda: tune.sample_from(3), "takes a function"),
])
def test_bad_sampler_arguments_say_what_is_wrong(make, words):
    with pytest.raises(S.SearchSpaceError, match=words):
        make()


def test_grid_is_a_cartesian_product_repeated_num_samples_times():
    space = {"a": tune.grid_search([1, 2, 3]), "nested": {"b": tune.grid_search(["x", "y"])},
             "lr": tune.loguniform(1e-3, 1e-1), "const": 7}
    g = tune.BasicVariantGenerator(seed=0)
    g.setup(space, "loss", "min", num_samples=2)
    assert g.total() == 12
    configs = []
    while (c := g.suggest("t")) is not FINISHED:
        configs.append(c)
    assert len(configs) == 12
    pairs = [(c["a"], c["nested"]["b"]) for c in configs]
    assert sorted(set(pairs)) == [(a, b) for a in (1, 2, 3) for b in ("x", "y")]
    assert all(pairs.count(p) == 2 for p in set(pairs))
    assert all(c["const"] == 7 and 1e-3 <= c["lr"] <= 1e-1 for c in configs)
    assert len({c["lr"] for c in configs}) == 12  # sampled afresh per trial


def test_same_seed_same_configs():
    space = {"x": tune.uniform(0, 1), "g": tune.grid_search([0, 1])}

    def draw(seed):
        g = tune.BasicVariantGenerator(seed=seed)
        g.setup(space, None, None, 3)
        return [g.suggest("t") for _ in range(6)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_sample_from_sees_the_resolved_config():
    space = {"a": tune.uniform(1, 2), "b": tune.sample_from(lambda spec: spec.config.a * 10),
             "c": tune.sample_from(lambda spec: spec.config["b"] + 1), "d": tune.sample_from(lambda: 4)}
    cfg = S.resolve(space, random.Random(0))
    assert cfg["b"] == pytest.approx(cfg["a"] * 10) and cfg["c"] == pytest.approx(cfg["b"] + 1) and cfg["d"] == 4


def test_domains_inside_lists_are_sampled():
    cfg = S.resolve({"layers": [tune.choice([8, 16]), 4]}, random.Random(0))
    assert cfg["layers"][0] in (8, 16) and cfg["layers"][1] == 4


@pytest.mark.parametrize("space, words", [
    ({}, "empty"),
    (None, "empty"),
    ([1, 2], "must be a dict"),
    ({1: tune.uniform(0, 1)}, "keys must be strings"),
    ({"x": tune.uniform}, "call it"),
    ({"x": {"grid_search": []}}, "at least one value"),
])
def test_malformed_param_space(space, words):
    with pytest.raises(S.SearchSpaceError, match=words):
        S.validate(space)


# ------------------------------------------------------------------ schedulers
def _res(metric, it, **kw):
    return {"loss": metric, "training_iteration": it, "time_total_s": float(it), **kw}


def test_asha_stops_trials_below_the_rung_cutoff():
    s = tune.ASHAScheduler(metric="loss", mode="min", max_t=9, grace_period=1, reduction_factor=3)
    assert [m for m, _ in s.brackets[0].rungs] == [3, 1]
    for i in range(6):
        s.on_trial_add(f"t{i}", {})
    # the first trial at a rung always goes on
    assert s.on_trial_result("t0", _res(1.0, 1)) == SC.CONTINUE
    # a worse one than the top third so far stops
    assert s.on_trial_result("t1", _res(5.0, 1)) == SC.STOP
    assert s.on_trial_result("t2", _res(0.5, 1)) == SC.CONTINUE  # better: goes on
    # between rungs: no decision
    assert s.on_trial_result("t0", _res(1.0, 2)) == SC.CONTINUE
    # at max_t the trial has used its budget
    assert s.on_trial_result("t2", _res(0.1, 9)) == SC.FINISH


def test_asha_with_mode_max_keeps_the_larger():
    s = tune.ASHAScheduler(metric="acc", mode="max", max_t=10, grace_period=1, reduction_factor=2)
    s.on_trial_result("a", {"acc": 0.9, "training_iteration": 1})
    assert s.on_trial_result("b", {"acc": 0.1, "training_iteration": 1}) == SC.STOP
    assert s.on_trial_result("c", {"acc": 0.95, "training_iteration": 1}) == SC.CONTINUE


def test_asha_takes_metric_and_mode_from_tune_config():
    s = tune.ASHAScheduler(max_t=4)
    s.set_search_properties("loss", "min")
    assert (s.metric, s.mode) == ("loss", "min")
    with pytest.raises(ValueError, match="needs a metric and a mode"):
        tune.ASHAScheduler().set_search_properties(None, None)


def test_scheduler_needing_a_metric_the_trial_does_not_report():
    s = tune.ASHAScheduler(metric="val_loss", mode="min", max_t=4)
    with pytest.raises(tune.MetricNotReported, match="'val_loss'.*reported only \\['loss', 'time_total_s', "
                                                      "'training_iteration'\\]"):
        s.on_trial_result("t0", _res(1.0, 1))


@pytest.mark.parametrize("make, words", [
    (lambda: tune.ASHAScheduler(mode="minimum"), "mode must be 'min' or 'max'"),
    (lambda: tune.ASHAScheduler(max_t=0), "max_t must be a number above 0"),
    (lambda: tune.ASHAScheduler(max_t=2, grace_period=5), "must not exceed max_t"),
    (lambda: tune.ASHAScheduler(reduction_factor=1), "reduction_factor must be above 1"),
    (lambda: tune.MedianStoppingRule(min_samples_required=0), "min_samples_required"),
    (lambda: tune.PopulationBasedTraining(), "needs hyperparam_mutations"),
    (lambda: tune.PopulationBasedTraining(hyperparam_mutations={"lr": [1]}, quantile_fraction=0.9), "quantile_fraction"),
])
def test_bad_scheduler_arguments(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_hyperband_spreads_trials_over_brackets_with_later_first_rungs():
    s = tune.HyperBandScheduler(metric="loss", mode="min", max_t=27, grace_period=1, reduction_factor=3)
    assert len(s.brackets) == 4
    firsts = [b.rungs[-1][0] if b.rungs else None for b in s.brackets]
    assert firsts == [1, 3, 9, None]   # the last bracket never halves: every trial runs to max_t
    for i in range(8):
        s.on_trial_add(f"t{i}", {})
    assert sorted(s.assigned.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # bracket 3 (t3, t7) has no rung: a bad trial is not stopped early
    s.on_trial_result("t3", _res(0.0, 1))
    assert s.on_trial_result("t7", _res(100.0, 5)) == SC.CONTINUE


def test_median_stopping_rule_with_a_fake_clock():
    s = tune.MedianStoppingRule(metric="loss", mode="min", grace_period=10, min_samples_required=2)
    clock = [0.0]

    def report(tid, loss):
        return s.on_trial_result(tid, {"loss": loss, "time_total_s": clock[0], "training_iteration": 1})

    for t in (0.0, 5.0, 10.0, 15.0):
        clock[0] = t
        report("good1", 1.0)
        report("good2", 1.2)
    clock[0] = 5.0
    assert report("bad", 9.0) == SC.CONTINUE   # inside the grace period
    clock[0] = 12.0
    assert report("bad", 9.0) == SC.STOP       # worse than the median of the others' running means
    clock[0] = 12.0
    assert report("ok", 0.5) == SC.CONTINUE


def test_median_stopping_needs_min_samples():
    s = tune.MedianStoppingRule(metric="loss", mode="min", grace_period=0, min_samples_required=3)
    s.on_trial_result("a", {"loss": 1, "time_total_s": 1})
    assert s.on_trial_result("b", {"loss": 50, "time_total_s": 1}) == SC.CONTINUE


def test_pbt_exploits_the_top_and_explores_its_config():
    s = tune.PopulationBasedTraining(metric="score", mode="max", time_attr="training_iteration",
                                     perturbation_interval=2,
                                     hyperparam_mutations={"lr": tune.uniform(0.001, 1.0), "bs": [16, 32, 64]},
                                     quantile_fraction=0.25, resample_probability=0.0, seed=0)
    configs = {f"t{i}": {"lr": 0.1 * (i + 1), "bs": 32} for i in range(4)}
    for tid, c in configs.items():
        s.on_trial_add(tid, c)
    for it in (1, 2):
        decisions = {tid: s.on_trial_result(tid, {"score": float(i), "training_iteration": it})
                     for i, tid in enumerate(configs)}
    # at iteration 2 the worst (t0, score 0) copies the best (t3)
    d = decisions["t0"]
    assert isinstance(d, SC.Exploit) and d.donor == "t3"
    assert d.config["lr"] == pytest.approx(0.4 * 0.8) or d.config["lr"] == pytest.approx(0.4 * 1.2)
    assert d.config["bs"] in (16, 64)   # a neighbour of 32
    assert all(decisions[t] == SC.CONTINUE for t in ("t1", "t2", "t3"))
    # before the next interval nobody perturbs
    assert s.on_trial_result("t0", {"score": 0.0, "training_iteration": 3}) == SC.CONTINUE


def test_pbt_resamples_with_probability_one():
    s = tune.PopulationBasedTraining(metric="m", mode="min", hyperparam_mutations={"opt": ["sgd", "adam"]},
                                     resample_probability=1.0, seed=1)
    seen = {s.explore({"opt": "sgd"})["opt"] for _ in range(40)}
    assert seen == {"sgd", "adam"}


def test_fifo_never_stops():
    s = tune.FIFOScheduler()
    s.set_search_properties(None, None)
    assert s.on_trial_result("a", {"x": 1}) == SC.CONTINUE


# ------------------------------------------------------------------ searchers
def test_optuna_search_ask_tell_and_pruning():
    space = {"x": tune.uniform(-5, 5), "n": tune.randint(1, 4), "act": tune.choice(["relu", "tanh"]),
             "fixed": 3, "derived": tune.sample_from(lambda spec: spec.config.x * 2)}
    o = tune.OptunaSearch(seed=0)
    o.setup(space, "loss", "min", num_samples=30)
    best = math.inf
    for i in range(30):
        c = o.suggest(f"t{i}")
        assert -5 <= c["x"] <= 5 and c["n"] in (1, 2, 3) and c["act"] in ("relu", "tanh") and c["fixed"] == 3
        assert c["derived"] == pytest.approx(c["x"] * 2)
        loss = (c["x"] - 2) ** 2
        best = min(best, loss)
        o.on_trial_result(f"t{i}", {"loss": loss, "training_iteration": 1})
        o.on_trial_complete(f"t{i}", {"loss": loss})
    assert o.suggest("t30") is FINISHED
    assert len(o.study.trials) == 30 and o.study.best_value == pytest.approx(best)
    assert best < 0.5  # TPE found the basin


def test_optuna_pruner_stops_a_bad_trial():
    import optuna

    o = tune.OptunaSearch(seed=0, pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    o.setup({"x": tune.uniform(0, 1)}, "loss", "min", num_samples=10)
    for i in range(3):
        o.suggest(f"g{i}")
        for step in range(1, 4):
            assert not o.on_trial_result(f"g{i}", {"loss": 0.1, "training_iteration": step})
        o.on_trial_complete(f"g{i}", {"loss": 0.1})
    o.suggest("bad")
    assert o.on_trial_result("bad", {"loss": 10.0, "training_iteration": 1}) is True
    o.on_trial_complete("bad", {"loss": 10.0}, pruned=True)
    assert o.study.trials[-1].state == optuna.trial.TrialState.PRUNED


@pytest.mark.parametrize("space, words", [
    ({"x": tune.grid_search([1, 2])}, "use tune.choice"),
    ({"x": tune.randn(0, 1)}, "no normal distribution"),
])
def test_optuna_refuses_what_it_cannot_search(space, words):
    with pytest.raises(S.SearchSpaceError, match=words):
        tune.OptunaSearch().setup(space, "loss", "min", 4)


def test_optuna_needs_metric_and_mode():
    with pytest.raises(ValueError, match="needs a metric and a mode"):
        tune.OptunaSearch().setup({"x": tune.uniform(0, 1)}, None, None, 4)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        tune.OptunaSearch(mode="best")


# ------------------------------------------------------------------ ResultGrid
def _trial(tid, losses, status=TERMINATED, **cfg):
    t = Trial(tid, cfg or {"x": len(losses)}, status=status)
    t.history = [{"loss": v, "training_iteration": i + 1} for i, v in enumerate(losses)]
    return t


def _grid():
    err = _trial("e", [], status=ERROR)
    err.error, err.error_text = ValueError("boom"), "Traceback ...\nValueError: boom"
    return tune.ResultGrid([_trial("a", [5, 4, 3], x=1), _trial("b", [9, 1, 6], x=2), _trial("c", [2, 2, 2.5], x=3),
                            err], metric="loss", mode="min")


def test_result_grid_basics():
    g = _grid()
    assert len(g) == 4
    assert g[0].config == {"x": 1} and g[0].metrics["loss"] == 3 and g[-1].error is not None
    assert g.num_errors == 1 and isinstance(g.errors[0], ValueError) and g.num_terminated == 3
    with pytest.raises(IndexError):
        g[4]
    assert [r.config["x"] for r in g[:2]] == [1, 2]


@pytest.mark.parametrize("scope, mode, best", [("last", "min", 3), ("all", "min", 2), ("avg", "min", 3),
                                               ("last", "max", 2), ("all", "max", 2), ("last-5-avg", "min", 3)])
def test_get_best_result_scopes(scope, mode, best):
    assert _grid().get_best_result("loss", mode, scope).config["x"] == best


def test_get_best_result_bad_input():
    g = _grid()
    with pytest.raises(KeyError, match="no trial reported the metric 'acc'; reported metrics: loss, "
                                       "training_iteration"):
        g.get_best_result("acc", "max")
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        g.get_best_result("loss", "lowest")
    with pytest.raises(ValueError, match="scope must be one of"):
        g.get_best_result("loss", "min", scope="best")
    with pytest.raises(ValueError, match="needs a metric and a mode"):
        tune.ResultGrid([_trial("a", [1])]).get_best_result()


def test_get_best_result_skips_nan():
    g = tune.ResultGrid([_trial("a", [float("nan")], x=1), _trial("b", [4.0], x=2)], "loss", "min")
    assert g.get_best_result().config["x"] == 2


def test_dataframe_one_row_per_trial():
    df = _grid().get_dataframe()
    assert len(df) == 4
    assert list(df["trial_id"]) == ["a", "b", "c", "e"]
    assert list(df["status"]) == [TERMINATED, TERMINATED, TERMINATED, ERROR]
    assert list(df["training_iteration"]) == [3, 3, 3, 0]
    assert list(df["config/x"]) == [1, 2, 3, 0]
    assert df["error"].iloc[3] == "ValueError: boom"
    assert list(_grid().get_dataframe(filter_metric="loss", filter_mode="min")["loss"])[:3] == [3, 1, 2]


# ------------------------------------------------------------------ live view
def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    v = ProgressView("loss", "min", total=4, enabled=True, plain_interval=10.0, stream=out)
    trials = [_trial("a", [3.0]), _trial("b", [1.0], status=STOPPED), Trial("c", {"x": 0}, status=RUNNING)]
    v.update(trials, now=0.0)
    v.update(trials, now=5.0)      # within the interval: nothing printed
    v.update(trials, now=11.0)
    v.close(trials, now=12.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("tune: 3/4 trials: 1 running, 1 done, 1 stopped, 0 errored, 0 pending")
    assert "best loss=1 (b " in lines[0]


def test_live_table_on_a_terminal():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    out = TTY()
    v = ProgressView("loss", "min", total=2, stream=out)
    trials = [_trial("a", [3.0]), Trial("z", {"x": 0}, status=ERROR)]
    v.update(trials, now=0.0)
    v.close(trials, now=1.0)
    text = out.getvalue()
    assert "trial" in text and "errored" in text and "a" in text


def test_summary_without_metric():
    assert "best" not in summary([_trial("a", [1.0])], None, None)
