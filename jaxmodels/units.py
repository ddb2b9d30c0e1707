"""Names users type for dtypes and sizes (CLI flags, config values), parsed in one place."""

from __future__ import annotations

import re

import jax.numpy as jnp

# Every spelling a flag or config.json may use -> the jnp dtype.
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
          "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes from an int or a string as transformers reads `max_shard_size`: '5GB' = 5e9, '5GiB' = 5 * 2**30."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"{what} must be positive, got {size}")
        return size
    m = _SIZE.match(str(size))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{what}={size!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"
