"""Device selection and seeding."""
from __future__ import annotations

import contextlib
import os
import random
from typing import ContextManager

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available (use --device cpu or auto)")
        if ":" in spec:
            index = spec.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ConfigError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA devices")
        return torch.device(spec)
    raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers, stable across processes (unlike ``hash`` of str)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def autocast_dtype(device: torch.device, precision: str) -> "torch.dtype | None":
    """The autocast dtype for ``precision`` (fp32 → None).  ``auto`` picks bf16 where the
    hardware runs it natively (CUDA with bf16 support, CPUs with AVX-512 BF16 / AMX), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else None
    raise ConfigError(f"unknown precision {precision!r}; use fp32, bf16, fp16 or auto")


def autocast(device: torch.device, precision: str) -> ContextManager[object]:
    """An autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
