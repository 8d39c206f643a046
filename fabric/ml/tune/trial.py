"""One trial's record in the driver: config, status, reported results, latest checkpoint, error.

Plain data (no cluster): the tuner updates it, the live table and ResultGrid read it, and
``to_state``/``from_state`` carry it through the experiment state file for ``Tuner.restore``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PENDING, RUNNING, TERMINATED, STOPPED, ERROR = "PENDING", "RUNNING", "TERMINATED", "STOPPED", "ERROR"
FINAL = (TERMINATED, STOPPED, ERROR)


class TrialError(Exception):
    """A trial's function raised; ``str()`` is the original error and its traceback on the worker.
    Used when the original exception cannot be rebuilt on the driver."""


@dataclass
class Trial:
    trial_id: str
    config: dict
    status: str = PENDING
    history: list = field(default_factory=list)
    checkpoint: str | None = None        # URL or path of the latest reported checkpoint
    error: BaseException | None = None
    error_text: str = ""
    path: str = ""
    restarts: int = 0                    # PBT exploits and resumes
    iteration_offset: int = 0            # iterations done before the current run (resume, exploit)
    time_offset: float = 0.0
    started: float | None = None
    ended: float | None = None
    stop_reason: str = ""
    index: int = 0

    @property
    def last_result(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def iterations(self) -> int:
        return int(self.last_result.get("training_iteration", 0))

    def to_state(self) -> dict:
        return {"trial_id": self.trial_id, "config": self.config, "status": self.status, "history": self.history,
                "checkpoint": self.checkpoint, "error_text": self.error_text, "path": self.path,
                "restarts": self.restarts, "stop_reason": self.stop_reason,
                "error_type": type(self.error).__name__ if self.error is not None else None}

    @classmethod
    def from_state(cls, d: dict) -> "Trial":
        t = cls(d["trial_id"], d["config"], d["status"], list(d.get("history", [])), d.get("checkpoint"),
                None, d.get("error_text", ""), d.get("path", ""), d.get("restarts", 0))
        t.stop_reason = d.get("stop_reason", "")
        if t.status == ERROR:
            t.error = TrialError(f"{d.get('error_type') or 'Error'} (from the restored experiment):\n{t.error_text}")
        return t
