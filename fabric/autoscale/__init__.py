"""The autoscaler: grows and shrinks a cluster's executors from outside the broker.

It polls the broker's STATUS (queue depth per shape, executors' load), asks its
:class:`~fabric.autoscale.policy.Policy` what to do, and has a provider carry it out: local
processes (:class:`~fabric.autoscale.providers.LocalProvider`) or EC2 Auto Scaling groups
(:class:`~fabric.autoscale.providers.AwsProvider`). Every decision, with its reason, is kept
in memory and appended as a JSON line to the decision log (``autoscaler.jsonl`` in the
cluster's log folder); :func:`last_decisions` reads it back.

    python -m fabric.autoscale --broker tcp://127.0.0.1:5555 --provider local --min 0 --max 4 \\
        --cpus-per-executor 1 --idle 10

See docs/autoscaling.md.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time

from ..config import pid_alive
from .policy import Decision, Instance, Machine, Policy, Pool
from .providers import AwsProvider, LocalProvider, Provider

__all__ = ["Autoscaler", "Policy", "Pool", "Decision", "Machine", "Instance", "Provider", "LocalProvider", "AwsProvider",
           "last_decisions", "format_decisions", "decision_log_path", "DECISION_LOG"]

log = logging.getLogger("fabric.autoscale")

DECISION_LOG = "autoscaler.jsonl"


def decision_log_path(log_dir: str) -> str:
    """Where the autoscaler of a cluster whose logs are in ``log_dir`` writes its decisions."""
    return os.path.join(log_dir, DECISION_LOG)


def last_decisions(log_file: str, n: int = 10) -> list[dict]:
    """The last ``n`` decisions of a decision log (oldest first); [] if there is none yet.
    ``log_file`` may also be a cluster's log folder."""
    if os.path.isdir(log_file):
        log_file = decision_log_path(log_file)
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            chunk = min(size, max(4096, n * 1024))
            while True:
                f.seek(size - chunk)
                lines = f.read().splitlines()
                if chunk == size or len(lines) > n:
                    break
                chunk = min(size, chunk * 4)
    except OSError:
        return []
    if chunk < size:
        lines = lines[1:]  # the first may be cut
    out = []
    for line in lines[-n:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def format_decisions(decisions) -> str:
    rows = []
    for d in decisions:
        d = d.to_dict() if isinstance(d, Decision) else d
        t = time.strftime("%H:%M:%S", time.localtime(d["time"]))
        n = f" {d['count']}" if d.get("count") else ""
        rows.append(f"{t} {d['kind']:<4} {d['action']}{n} [{d['code']}] {d['reason']}")
    return "\n".join(rows)


class Autoscaler:
    """The loop: STATUS -> policy -> provider, and the decision log."""

    def __init__(self, address: str, provider: Provider, policy: Policy, log_file: str | None = None,
                 interval: float = 0.5, status_timeout: float = 2.0, keep: int = 1000):
        self.address = address
        self.provider = provider
        self.policy = policy
        self.log_file = log_file
        self.interval = interval
        self.status_timeout = status_timeout
        self.decisions: collections.deque = collections.deque(maxlen=keep)
        self.last_hold: dict[str, str | None] = {}
        self.last_status: dict | None = None
        self.running = True
        self._ctx = None

    # ------------------------------------------------------------------------------------------
    def status(self) -> dict:
        import zmq

        from .. import protocol as P
        from ..control import request

        if self._ctx is None:
            self._ctx = zmq.Context()
        return request(self.address, P.STATUS, timeout=self.status_timeout, ctx=self._ctx)

    def step(self, now: float | None = None, status: dict | None = None) -> list[Decision]:
        """One round: read the broker's status, decide, act. Returns the decisions made."""
        status = self.status() if status is None else status
        self.last_status = status
        now = time.time() if now is None else now
        try:
            instances = self.provider.instances()
        except Exception as e:  # noqa: BLE001 - a cloud API hiccup must not stop the loop
            d = Decision(now, "-", "error", "provider", f"listing instances failed: {type(e).__name__}: {e}")
            self.record(d)
            return [d]
        decisions = self.policy.decide(status, now, instances)
        for d in decisions:
            self.apply(d)
        return decisions

    def apply(self, d: Decision):
        try:
            if d.action == "launch":
                ids = self.provider.launch(d.count, d.kind)
                d.ids = list(ids)
            elif d.action == "terminate":
                self.provider.terminate(d.ids)
            elif d.action == "replace":
                new = self.provider.replace(d.ids)
                if new:
                    d.reason += f" by {', '.join(new)}"
        except Exception as e:  # noqa: BLE001
            self.record(d)
            self.record(Decision(d.time, d.kind, "error", d.code,
                                 f"{d.action} failed: {type(e).__name__}: {e}", d.count, d.ids, d.desired,
                                 d.current))
            return
        self.record(d)

    def record(self, d: Decision):
        if d.action == "hold":  # a state, not an event: log it when it changes
            if self.last_hold.get(d.kind) == d.code:
                return
            self.last_hold[d.kind] = d.code
        else:
            self.last_hold[d.kind] = None
        self.decisions.append(d)
        (log.warning if d.action == "error" else log.info)("%s %s %s: %s", d.kind, d.action, d.ids or d.count or "",
                                                           d.reason)
        if self.log_file:
            try:
                with open(self.log_file, "a") as f:
                    f.write(json.dumps(d.to_dict()) + "\n")
            except OSError as e:
                log.warning("cannot write the decision log %s: %s", self.log_file, e)

    # ------------------------------------------------------------------------------------------
    def run(self, broker_gone_s: float = 10.0, first_contact_s: float = 60.0, parent_pid: int = 0):
        """Poll until stopped. Exits when the broker has not answered for ``broker_gone_s``
        (``first_contact_s`` before its first answer), or when ``parent_pid`` is gone."""
        from ..errors import FabricError

        started = last_ok = time.monotonic()
        seen, last_error = False, None
        try:
            while self.running:
                t0 = time.monotonic()
                try:
                    self.step()
                    last_ok, seen = time.monotonic(), True
                except FabricError as e:
                    waited = time.monotonic() - (last_ok if seen else started)
                    # nothing listens any more (not merely slow): the cluster was stopped
                    limit = min(1.0, broker_gone_s) if seen and _endpoint_gone(self.address) else \
                        broker_gone_s if seen else first_contact_s
                    if waited > limit:
                        log.info("the broker at %s has not answered for %.0fs (%s); stopping",
                                 self.address, waited, e)
                        break
                except Exception as e:  # noqa: BLE001 - keep scaling; say it once, not every poll
                    if repr(e) != last_error:
                        last_error = repr(e)
                        log.exception("autoscaler round failed")
                        self.record(Decision(time.time(), "-", "error", "internal", f"{type(e).__name__}: {e}"))
                if parent_pid and not pid_alive(parent_pid):
                    log.info("parent process %d is gone; stopping", parent_pid)
                    break
                time.sleep(max(0.0, self.interval - (time.monotonic() - t0)))
        finally:
            self.close()

    def stop(self):
        self.running = False

    def close(self):
        try:
            self.provider.close()
        finally:
            if self._ctx is not None:
                self._ctx.destroy(linger=0)
                self._ctx = None


def _endpoint_gone(address: str) -> bool:
    """True when nothing listens at the broker's address (a stopped broker, not a busy one)."""
    import socket

    if address.startswith("ipc://"):
        return not os.path.exists(address[len("ipc://"):])
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                return False
        except ConnectionRefusedError:
            return True
        except (OSError, ValueError):
            return False
    return False


