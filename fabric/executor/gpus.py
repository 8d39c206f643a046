"""Which GPUs this host has. ``FABRIC_GPUS`` overrides detection ("0,1", or "" for none), so
the scheduling logic can be exercised on machines without a GPU."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

from .. import settings


def detect_gpus() -> list[int]:
    forced = settings.get().gpus
    if forced is not None:
        return parse_gpu_list(forced)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                return [int(x) for x in out.stdout.split() if x.strip().isdigit()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    if importlib.util.find_spec("torch") is not None:
        try:  # in a subprocess: importing torch here would cost this daemon seconds and memory
            out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                 capture_output=True, text=True, timeout=60)
            n = int(out.stdout.strip() or 0)
            return list(range(n))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return []


def parse_gpu_list(text: str) -> list[int]:
    text = text.strip()
    if not text or text.lower() == "none":
        return []
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"GPU list must be comma-separated device numbers like '0,1', got {text!r}") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"GPU list must hold distinct non-negative device numbers, got {text!r}")
    return ids
