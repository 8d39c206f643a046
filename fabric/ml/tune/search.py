"""Search spaces: the samplers (``uniform`` ... ``sample_from``) and their expansion into trial configs.

Pure code: no cluster, no clock. A ``param_space`` is a dict (nested dicts and lists allowed) whose
leaves are plain values or ``Domain`` objects. ``grid_search`` leaves expand as a Cartesian
product; every other domain is sampled once per trial; ``sample_from(fn)`` runs last, with the rest
of the resolved config in ``spec.config`` (attribute or item access, as in Ray Tune).
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Callable


class SearchSpaceError(ValueError):
    """A ``param_space`` or a sampler that cannot work; the message says which and why."""


def _num(where: str, name: str, v, *, integer=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        kind = "a whole number" if integer else "a number"
        raise SearchSpaceError(f"{where}: {name} must be {kind}, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise SearchSpaceError(f"{where}: {name} must be finite, got {v!r}")
    return int(v) if integer else v


def _order(where: str, lower, upper):
    if not lower < upper:
        raise SearchSpaceError(f"{where}: lower must be below upper, got lower={lower!r} upper={upper!r} "
                               f"(did you swap them?)")


class Domain:
    """One searchable parameter. ``sample(rng, spec)`` draws a value."""

    def sample(self, rng: random.Random, spec=None):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"tune.{type(self).__name__.lower()}({args})"


class Float(Domain):
    def __init__(self, lower, upper, q=None, log=False, base=10.0, kind="uniform"):
        where = f"tune.{kind}({lower!r}, {upper!r})"
        self.lower, self.upper = _num(where, "lower", lower), _num(where, "upper", upper)
        _order(where, self.lower, self.upper)
        self.q = None if q is None else _num(where, "q", q)
        if self.q is not None and self.q <= 0:
            raise SearchSpaceError(f"{where}: q must be above 0, got {q!r}")
        self.log, self.base = log, base
        if log and self.lower <= 0:
            raise SearchSpaceError(f"{where}: a log scale needs lower > 0, got {lower!r}")

    def sample(self, rng, spec=None):
        if self.log:
            lo, hi = math.log(self.lower), math.log(self.upper)
            v = math.exp(rng.uniform(lo, hi))
        else:
            v = rng.uniform(self.lower, self.upper)
        if self.q is not None:
            v = round(v / self.q) * self.q
            v = min(max(v, self.lower), self.upper)
        return v


class Integer(Domain):
    def __init__(self, lower, upper, q=1, inclusive=False, log=False, kind="randint"):
        where = f"tune.{kind}({lower!r}, {upper!r})"
        self.lower = _num(where, "lower", lower, integer=True)
        self.upper = _num(where, "upper", upper, integer=True)
        self.q = _num(where, "q", q, integer=True)
        if self.q < 1:
            raise SearchSpaceError(f"{where}: q must be at least 1, got {q!r}")
        self.inclusive, self.log = inclusive, log
        if inclusive:
            if not self.lower <= self.upper:
                raise SearchSpaceError(f"{where}: lower must not be above upper, got lower={lower!r} "
                                       f"upper={upper!r} (did you swap them?)")
        else:
            _order(where, self.lower, self.upper)
        if log and self.lower <= 0:
            raise SearchSpaceError(f"{where}: a log scale needs lower > 0, got {lower!r}")

    @property
    def high(self) -> int:
        """The largest value that can be drawn."""
        return self.upper if self.inclusive else self.upper - 1

    def sample(self, rng, spec=None):
        if self.log:
            v = int(round(math.exp(rng.uniform(math.log(self.lower), math.log(self.high)))))
        else:
            v = rng.randint(self.lower, self.high)
        if self.q > 1:
            v = int(round(v / self.q) * self.q)
            v = min(max(v, self.lower), self.high)
        return v


class Normal(Domain):
    def __init__(self, mean=0.0, sd=1.0, q=None):
        where = f"tune.randn({mean!r}, {sd!r})"
        self.mean, self.sd = _num(where, "mean", mean), _num(where, "sd", sd)
        if self.sd <= 0:
            raise SearchSpaceError(f"{where}: sd must be above 0, got {sd!r}")
        self.q = None if q is None else _num(where, "q", q)

    def sample(self, rng, spec=None):
        v = rng.gauss(self.mean, self.sd)
        return round(v / self.q) * self.q if self.q else v


class Categorical(Domain):
    def __init__(self, categories):
        if isinstance(categories, (str, bytes, dict)) or not hasattr(categories, "__iter__"):
            raise SearchSpaceError(f"tune.choice() takes a list of options, got {type(categories).__name__}")
        self.categories = list(categories)
        if not self.categories:
            raise SearchSpaceError("tune.choice() needs at least one option, got an empty list")

    def sample(self, rng, spec=None):
        return self.categories[rng.randrange(len(self.categories))]


class Function(Domain):
    """``sample_from(fn)``: ``fn(spec)`` with the rest of the config resolved in ``spec.config``."""

    def __init__(self, func: Callable):
        if not callable(func):
            raise SearchSpaceError(f"tune.sample_from() takes a function, got {type(func).__name__}")
        self.func = func
        import inspect
        try:
            self.nargs = len(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            self.nargs = 1

    def sample(self, rng, spec=None):
        return self.func(spec) if self.nargs else self.func()


class Grid:
    """``grid_search(values)``: every value is tried (a Cartesian product with the other grids)."""

    def __init__(self, values):
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise SearchSpaceError(f"tune.grid_search() takes a list of values, got {type(values).__name__}")
        self.values = list(values)
        if not self.values:
            raise SearchSpaceError("tune.grid_search() needs at least one value, got an empty list")

    def __repr__(self):
        return f"tune.grid_search({self.values!r})"


# ------------------------------------------------------------------ the public samplers (Ray Tune's names)
def uniform(lower: float, upper: float) -> Float:
    return Float(lower, upper, kind="uniform")


def quniform(lower: float, upper: float, q: float) -> Float:
    return Float(lower, upper, q=q, kind="quniform")


def loguniform(lower: float, upper: float, base: float = 10) -> Float:
    return Float(lower, upper, log=True, base=base, kind="loguniform")


def qloguniform(lower: float, upper: float, q: float, base: float = 10) -> Float:
    return Float(lower, upper, q=q, log=True, base=base, kind="qloguniform")


def randint(lower: int, upper: int) -> Integer:
    """A whole number in ``[lower, upper)`` (upper excluded, as Python's ``range``)."""
    return Integer(lower, upper, kind="randint")


def qrandint(lower: int, upper: int, q: int = 1) -> Integer:
    """A multiple of ``q`` in ``[lower, upper]`` (upper included, as in Ray Tune)."""
    return Integer(lower, upper, q=q, inclusive=True, kind="qrandint")


def lograndint(lower: int, upper: int) -> Integer:
    return Integer(lower, upper, log=True, kind="lograndint")


def randn(mean: float = 0.0, sd: float = 1.0) -> Normal:
    return Normal(mean, sd)


def qrandn(mean: float, sd: float, q: float) -> Normal:
    return Normal(mean, sd, q)


def choice(categories) -> Categorical:
    return Categorical(categories)


def sample_from(func: Callable) -> Function:
    return Function(func)


def grid_search(values) -> dict:
    """A grid axis. Returned as Ray's ``{"grid_search": [...]}`` dict so configs print the same."""
    return {"grid_search": Grid(values).values}


# ------------------------------------------------------------------ walking a space
def _is_grid(v) -> bool:
    return isinstance(v, Grid) or (isinstance(v, dict) and len(v) == 1 and "grid_search" in v)


def _grid_values(v) -> list:
    return v.values if isinstance(v, Grid) else Grid(v["grid_search"]).values


def leaves(space, path=()):
    """``(path, value)`` for every leaf of a nested dict/list space; a grid is one leaf."""
    if _is_grid(space):
        yield path, space
    elif isinstance(space, dict):
        for k, v in space.items():
            yield from leaves(v, path + (k,))
    elif isinstance(space, list):
        for i, v in enumerate(space):
            yield from leaves(v, path + (i,))
    else:
        yield path, space


def validate(space, where: str = "param_space") -> dict:
    """Check a param_space's shape; return it. Raises ``SearchSpaceError`` saying what is wrong."""
    if space is None or (isinstance(space, dict) and not space):
        raise SearchSpaceError(f"{where} is empty: nothing to tune. Give at least one parameter, e.g. "
                               f"{{'lr': tune.loguniform(1e-4, 1e-1)}}")
    if not isinstance(space, dict):
        raise SearchSpaceError(f"{where} must be a dict of parameter names to values or samplers "
                               f"(tune.uniform, tune.choice, ...), got {type(space).__name__}")

    def walk(node, path):
        if _is_grid(node):
            _grid_values(node)
            return
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise SearchSpaceError(f"{where}: keys must be strings, got {k!r} ({type(k).__name__}) at "
                                           f"{_fmt(path) or 'the top level'}")
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        elif isinstance(node, type) and issubclass(node, Domain):
            raise SearchSpaceError(f"{where}[{_fmt(path)}] is the class {node.__name__}; call a sampler "
                                   f"such as tune.uniform(0, 1)")
        elif callable(node) and getattr(node, "__module__", "").endswith("tune.search") and not isinstance(node, Domain):
            raise SearchSpaceError(f"{where}[{_fmt(path)}] is the function {node.__name__} itself; "
                                   f"call it with its arguments, e.g. tune.{node.__name__}(...)")
    walk(space, ())
    return space


def _fmt(path) -> str:
    return "".join(f"[{p!r}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _set(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _copy(space):
    if isinstance(space, dict) and not _is_grid(space):
        return {k: _copy(v) for k, v in space.items()}
    if isinstance(space, list):
        return [_copy(v) for v in space]
    return space


class AttrDict(dict):
    """A dict whose keys read as attributes too: ``spec.config.lr`` (Ray Tune's sample_from spec)."""

    def __getattr__(self, name):
        try:
            v = self[name]
        except KeyError:
            raise AttributeError(f"the config has no key {name!r} (yet: sample_from sees only resolved values)") from None
        return AttrDict(v) if isinstance(v, dict) and not isinstance(v, AttrDict) else v


class _Spec:
    def __init__(self, config):
        self.config = AttrDict(config)

    def __getitem__(self, k):
        if k == "config":
            return self.config
        raise KeyError(k)


def grid_points(space) -> list[dict]:
    """The Cartesian product of the space's grid axes: a list of ``{path: value}`` (one ``{}`` if none)."""
    axes = [(path, _grid_values(v)) for path, v in leaves(space) if _is_grid(v)]
    if not axes:
        return [{}]
    return [dict(zip((p for p, _ in axes), combo)) for combo in itertools.product(*(vals for _, vals in axes))]


def resolve(space, rng: random.Random, fixed: dict | None = None) -> dict:
    """One concrete config: grid axes from ``fixed`` ({path: value}), domains sampled, then sample_from."""
    fixed = fixed or {}
    cfg = _copy(space)
    later = []
    for path, v in list(leaves(space)):
        if path in fixed:
            _set(cfg, path, fixed[path])
        elif _is_grid(v):
            _set(cfg, path, _grid_values(v)[0])
        elif isinstance(v, Function):
            later.append((path, v))
        elif isinstance(v, Domain):
            _set(cfg, path, v.sample(rng))
    for path, v in later:  # in order, so a later sample_from can read an earlier one
        _set(cfg, path, v.sample(rng, _Spec(cfg)))
    return cfg


def count_variants(space, num_samples: int) -> int:
    return len(grid_points(space)) * num_samples


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (dataframe columns, as Ray's ``config/a/b``)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def get_path(config, path):
    for p in path:
        config = config[p]
    return config
