"""Resource requests: parsing and checking what a user asks for (cpus, gpus, memory)."""
from __future__ import annotations


def parse_memory(value) -> int:
    """'2GiB', '512MB', '1.5G', 1024 -> bytes. ValueError with the accepted forms otherwise."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError("memory must be a size like '2GiB' or a number of bytes, not a bool")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"memory must not be negative, got {value}")
        return int(value)
    text = str(value).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
    i = len(text)
    while i and not text[i - 1].isdigit() and text[i - 1] != ".":
        i -= 1
    num, unit = text[:i], text[i:].lower()
    try:
        n = float(num)
    except ValueError:
        n = None
    if n is None or unit not in units or n < 0:
        raise ValueError(f"memory must be a size like '512MiB', '2GiB' or '1.5GB', got {value!r}")
    return int(n * units[unit])
