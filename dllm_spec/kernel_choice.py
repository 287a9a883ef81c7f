"""``kernels="auto"``: pick the CPU matmul path by measuring it on the running machine.

A kernel that wins on one CPU loses on another (oneDNN-packed fp32 linears are 1.8x faster than
MKL on an AVX512 AMD EPYC and 1.3x slower on an AMX Xeon; bf16 packing needs AVX512-BW/VL/DQ or
AVX-NE-CONVERT and raises elsewhere). So ``auto`` times the model's own linear shapes, stock
``F.linear`` against the packed path, at 1 and 16 rows (a decoding step and a verify), weighted by
how often each shape occurs, and packs only when that is faster at one row and not slower at 16:
never a path slower than stock. The choice is cached per CPU, torch version, dtype, thread count
and shapes (``<cache>/kernels/*.json``), so only the first load on a machine pays (about a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from dllm_spec.kernels import pack_weight, packed_linear, packing_supported

#: rows timed: a one-token step and a 16-token verify
ROWS = (1, 16)
#: packed must beat stock by this factor at one row to be chosen
MARGIN = 0.95


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return model + " " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))


def linear_shapes(model: nn.Module) -> Counter:
    """(out_features, in_features) -> how many ``nn.Linear`` of the model have that shape."""
    return Counter((m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear))


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def measure(shapes: Counter, dtype: torch.dtype, repeats: int = 7) -> dict[str, dict[int, float]]:
    """Seconds per model-worth of linears: {"default": {rows: s}, "packed": {rows: s}}, each shape
    timed stock and packed in alternation (median of ``repeats``), weighted by its count."""
    totals = {"default": dict.fromkeys(ROWS, 0.0), "packed": dict.fromkeys(ROWS, 0.0)}
    gen = torch.Generator().manual_seed(0)
    for (n, k), count in shapes.items():
        weight = torch.randn(n, k, generator=gen).to(dtype)
        packed = pack_weight(weight)
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen).to(dtype)
            stock_fn, packed_fn = (lambda: torch.nn.functional.linear(x, weight)), (lambda: packed_linear(x, packed))
            stock_fn(), packed_fn()  # warm-up
            stock, fast = [], []
            for _ in range(repeats):
                stock.append(_seconds(stock_fn))
                fast.append(_seconds(packed_fn))
            totals["default"][rows] += count * sorted(stock)[repeats // 2]
            totals["packed"][rows] += count * sorted(fast)[repeats // 2]
    return totals


def decide(timings: dict[str, dict[int, float]]) -> str:
    """ "packed" when it is faster at one row (by ``MARGIN``) and not slower at 16 rows, else "default"."""
    stock, packed = timings["default"], timings["packed"]
    return "packed" if packed[1] < MARGIN * stock[1] and packed[16] <= stock[16] else "default"


def choose_kernels(model: nn.Module, cache_root: Path) -> str:
    """The measured (and cached) choice for ``model`` on this machine: ``"packed"`` or ``"default"``."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or not packing_supported(param.dtype):
        return "default"
    shapes = linear_shapes(model)
    key = json.dumps(
        [_cpu_signature(), torch.__version__, str(param.dtype), torch.get_num_threads(), sorted(shapes.items())]
    )
    path = cache_root / "kernels" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("choice") in ("packed", "default"):
            return cached["choice"]
    except (OSError, ValueError, AttributeError):
        pass
    print(
        f"dllm-spec: timing stock and packed matmuls for {param.dtype} on this CPU (once; cached in {path.parent})",
        file=sys.stderr,
    )
    timings = measure(shapes, param.dtype)
    choice = decide(timings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dict(choice=choice, key=json.loads(key), timings=timings)))
        os.replace(tmp, path)
    except OSError:
        pass  # measured again next time
    return choice
