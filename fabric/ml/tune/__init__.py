"""fabric.ml.tune: hyperparameter search with Ray Tune's names, built for many small trials.

    from fabric.ml import tune
    def train(config):
        for i in range(10):
            tune.report({"loss": (config["x"] - 3) ** 2 / (i + 1)})
    grid = tune.Tuner(train, param_space={"x": tune.uniform(0, 6)},
                      tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=32,
                                                  scheduler=tune.ASHAScheduler(max_t=10))).fit()
    grid.get_best_result().config

Each trial is a fabric call (or a Trainer's gang); the scheduler and searcher are pure code in
the driver (``schedulers.py``, ``searchers.py``, ``search.py``). See docs/tune.md.
"""
from fabric.ml.checkpoint import Checkpoint
from fabric.ml.session import get_checkpoint, get_context, report

from .result_grid import ResultGrid
from .schedulers import (ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler,
                         MedianStoppingRule, MetricNotReported, PopulationBasedTraining, TrialScheduler)
from .search import (Domain, SearchSpaceError, choice, grid_search, lograndint, loguniform, qloguniform, qrandint,
                     qrandn, quniform, randint, randn, sample_from, uniform)
from .searchers import BasicVariantGenerator, OptunaSearch, Searcher
from .trial import Trial, TrialError
from .tuner import TuneConfig, TuneError, Tuner, with_parameters, with_resources

__all__ = ["Tuner", "TuneConfig", "ResultGrid", "report", "get_checkpoint", "get_context", "Checkpoint",
           "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint", "lograndint", "randn", "qrandn",
           "choice", "grid_search", "sample_from", "Domain", "SearchSpaceError",
           "TrialScheduler", "FIFOScheduler", "ASHAScheduler", "AsyncHyperBandScheduler", "HyperBandScheduler",
           "MedianStoppingRule", "PopulationBasedTraining", "MetricNotReported",
           "Searcher", "BasicVariantGenerator", "OptunaSearch",
           "with_resources", "with_parameters", "Trial", "TrialError", "TuneError"]
