"""The live view of a sweep: a rich table refreshed in place on a terminal, plain lines otherwise.

``ProgressView.update(trials, now)`` is cheap to call on every event: it redraws at most every
``interval`` seconds of the clock it is given (no clock of its own), so the tuner's loop pays
nothing per report for it.
"""
from __future__ import annotations

import sys

from .trial import ERROR, PENDING, RUNNING, STOPPED, TERMINATED


def counts(trials) -> dict:
    c = {PENDING: 0, RUNNING: 0, TERMINATED: 0, STOPPED: 0, ERROR: 0}
    for t in trials:
        c[t.status] += 1
    return c


def best(trials, metric, mode):
    if not metric or mode not in ("min", "max"):
        return None
    top = None
    for t in trials:
        v = t.last_result.get(metric)
        if isinstance(v, (int, float)) and v == v:
            if top is None or (v > top[1] if mode == "max" else v < top[1]):
                top = (t, v)
    return top


def summary(trials, metric, mode, total=None, elapsed=None) -> str:
    c = counts(trials)
    parts = [f"{c[RUNNING]} running", f"{c[TERMINATED]} done", f"{c[STOPPED]} stopped", f"{c[ERROR]} errored",
             f"{c[PENDING]} pending"]
    head = f"tune: {len(trials)}" + (f"/{total}" if total else "") + " trials: " + ", ".join(parts)
    if elapsed is not None:
        head += f" ({elapsed:.1f}s)"
    b = best(trials, metric, mode)
    if b is not None:
        head += f"; best {metric}={b[1]:.6g} ({b[0].trial_id} {_short(b[0].config)})"
    return head


def _short(cfg) -> str:
    s = ", ".join(f"{k}={_fmt(v)}" for k, v in cfg.items())
    return s if len(s) <= 80 else s[:77] + "..."


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + _short(v) + "}"
    return repr(v) if isinstance(v, str) else str(v)


class ProgressView:
    """``enabled=None``: a rich Live table when stdout is a terminal, else a plain line every
    ``plain_interval`` seconds and one at the end."""

    def __init__(self, metric=None, mode=None, total=None, enabled=True, interval=0.25, plain_interval=10.0,
                 stream=None, max_rows=20):
        self.metric, self.mode, self.total = metric, mode, total
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else plain_interval
        self.max_rows = max_rows
        self.last = None
        self.live = None
        self.start = None

    def _table(self, trials, elapsed):
        from rich.table import Table

        t = Table(title=summary(trials, self.metric, self.mode, self.total, elapsed), title_justify="left",
                  expand=False)
        for col in ("trial", "status", "iter", self.metric or "last metric", "config"):
            t.add_column(col)
        active = [x for x in trials if x.status == RUNNING]
        finished = [x for x in trials if x.status in (TERMINATED, STOPPED, ERROR)]
        b = best(trials, self.metric, self.mode)
        shown = (active + finished[-max(0, self.max_rows - len(active)):])[: self.max_rows]
        if b is not None and b[0] not in shown:
            shown.append(b[0])
        for x in shown:
            r = x.last_result
            v = r.get(self.metric) if self.metric else None
            style = {ERROR: "red", STOPPED: "yellow", TERMINATED: "green"}.get(x.status)
            t.add_row(x.trial_id, x.status.lower(), str(r.get("training_iteration", 0)),
                      "" if v is None else f"{v:.6g}", _short(x.config), style=style)
        return t

    def update(self, trials, now: float, force: bool = False):
        if not self.enabled:
            return
        if self.start is None:
            self.start = now
        if not force and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            if self.live is None:
                self.live = Live(self._table(trials, elapsed), console=Console(file=self.stream),
                                 auto_refresh=False, transient=False)
                self.live.start()
            self.live.update(self._table(trials, elapsed), refresh=True)
        else:
            print(summary(trials, self.metric, self.mode, self.total, elapsed), file=self.stream, flush=True)

    def close(self, trials, now: float):
        if not self.enabled:
            return
        if self.start is None:
            self.start = now
        if self.tty:
            self.update(trials, now, force=True)
            if self.live is not None:
                self.live.stop()
        else:
            print(summary(trials, self.metric, self.mode, self.total, now - self.start), file=self.stream, flush=True)
