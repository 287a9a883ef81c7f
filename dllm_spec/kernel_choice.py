"""``kernels="auto"``: pick the CPU matmul path by measuring it on the running machine.

A kernel that wins on one CPU loses on another (oneDNN-packed fp32 linears are 1.8x faster than
MKL on an AVX512 AMD EPYC and 1.3x slower on an AMX Xeon; bf16 packing needs AVX512-BW/VL/DQ or
AVX-NE-CONVERT and raises elsewhere; on a 2-core AVX2 EPYC stock MKL is 1.2x faster at one row
and the packed path 1.4x faster at 16). So ``auto`` times the model's own linear shapes, stock
``F.linear`` against the packed path, at 1 to 16 rows (a decoding step up to a verify), weighted by
how often each shape occurs, and packs from the fewest rows at which packed wins at that row count
and every larger one; below it the layers keep the stock path: never a path slower than stock
where it was measured. The choice is cached per CPU, torch version, dtype, thread count and shapes
(``<cache>/kernels/*.json``), so only the first load on a machine pays (a few seconds).
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

#: rows timed: a one-token step up to a 16-token verify
ROWS = (1, 2, 4, 8, 16)
#: packed must beat stock by this factor at a row count to be chosen there
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


def decide(timings: dict[str, dict[int, float]]) -> int | None:
    """The fewest measured rows from which the packed path is faster (by ``MARGIN``) at that row
    count and at every larger one; ``None`` when it is not faster at the most rows (stay stock)."""
    stock, packed = timings["default"], timings["packed"]
    rows = sorted(int(r) for r in stock)
    packed_from = None
    for m in reversed(rows):
        if not packed[m] < MARGIN * stock[m]:
            break
        packed_from = m
    return packed_from


def _choice(packed_from: int | None) -> tuple[str, int]:
    return ("default", 1) if packed_from is None else ("packed", packed_from)


def _cached(path: Path) -> tuple[str, int] | None:
    try:
        cached = json.loads(path.read_text())
        if cached.get("choice") in ("packed", "default") and isinstance(cached.get("packed_from"), int):
            return cached["choice"], max(1, cached["packed_from"])
    except (OSError, ValueError, AttributeError):
        pass
    return None


def choose_kernels(model: nn.Module, cache_root: Path) -> tuple[str, int]:
    """The measured (and cached) choice for ``model`` on this machine: ``("packed", packed_from)``
    (the packed path from ``packed_from`` rows on) or ``("default", 1)``."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or not packing_supported(param.dtype):
        return "default", 1
    shapes = linear_shapes(model)
    key = json.dumps(
        [_cpu_signature(), torch.__version__, str(param.dtype), torch.get_num_threads(), sorted(shapes.items())]
    )
    path = cache_root / "kernels" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    cached = _cached(path)
    if cached is not None:
        return cached
    print(
        f"dllm-spec: timing stock and packed matmuls for {param.dtype} on this CPU (once; cached in {path.parent})",
        file=sys.stderr,
    )
    timings = measure(shapes, param.dtype)
    choice, packed_from = _choice(decide(timings))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        record = dict(choice=choice, packed_from=packed_from, key=json.loads(key), timings=timings)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass  # measured again next time
    return choice, packed_from
