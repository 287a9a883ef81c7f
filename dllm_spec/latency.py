"""A measured latency curve of the target: seconds for one KV-cached forward over k tokens, on the
running device/dtype. Measured once (a few seconds), cached on disk per model/device/dtype, and
refreshed online from the verify times the loop observes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from dllm_spec.cache import crop_cache, forward_with_cache, new_cache
from dllm_spec.target import cache_root

DEFAULT_POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class LatencyCurve:
    """Piecewise-linear seconds(k) through measured points; ``observe`` folds in live timings (EMA)."""

    def __init__(self, points: dict[int, float], momentum: float = 0.9) -> None:
        if not points or any(k <= 0 or t <= 0 for k, t in points.items()):
            raise ValueError(f"latency points need k > 0 and seconds > 0, got {points}")
        self.points = dict(sorted(points.items()))
        self.momentum = momentum

    def __call__(self, k: int) -> float:
        """Seconds for a forward over k tokens (k >= 1), interpolated; extrapolated linearly past the last point."""
        ks = list(self.points)
        if k <= ks[0]:
            return self.points[ks[0]]
        for lo, hi in zip(ks, ks[1:]):
            if k <= hi:
                w = (k - lo) / (hi - lo)
                return (1 - w) * self.points[lo] + w * self.points[hi]
        lo, hi = ks[-2:] if len(ks) > 1 else (ks[0], ks[0])
        slope = (self.points[hi] - self.points[lo]) / (hi - lo) if hi > lo else 0.0
        return self.points[hi] + slope * (k - hi)

    def observe(self, k: int, seconds: float) -> None:
        """Refresh the nearest measured point with a live timing of a k-token forward."""
        nearest = min(self.points, key=lambda p: abs(p - k))
        if nearest == k:
            self.points[k] = self.momentum * self.points[k] + (1 - self.momentum) * seconds

    def to_json(self) -> dict:
        return {str(k): v for k, v in self.points.items()}


def _key(model: PreTrainedModel) -> str:
    cfg = model.config
    ident = f"{getattr(cfg, '_name_or_path', '')}|{cfg.model_type}|{cfg.hidden_size}|{cfg.num_hidden_layers}|{cfg.vocab_size}"
    dev = model.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{torch.get_num_threads()}"
    return hashlib.sha1(f"{ident}|{name}|{model.dtype}".encode()).hexdigest()[:16]


@torch.inference_mode()
def measure_latency(model: PreTrainedModel, points: tuple[int, ...] = DEFAULT_POINTS, context: int = 128, repeats: int = 3) -> LatencyCurve:
    """Time KV-cached forwards of k tokens after a ``context``-token prefix (median of ``repeats``)."""
    device = model.device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, context + max(points)), generator=torch.Generator().manual_seed(0)).to(device)
    cache = new_cache(model)
    forward_with_cache(model, ids[:, :context], cache)
    timings = {}
    for k in (points[0], *points):  # first entry doubles as warm-up
        runs = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            forward_with_cache(model, ids[:, context: context + k], cache)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - t0)
            crop_cache(cache, context)
        timings[k] = sorted(runs)[len(runs) // 2]
    return LatencyCurve(timings)


def load_or_measure(model: PreTrainedModel, cache_dir: str | os.PathLike | None = None) -> LatencyCurve:
    """The cached curve for this model/device/dtype, measuring (and caching) it when missing."""
    path = Path(cache_dir or cache_root() / "latency") / f"{_key(model)}.json"
    if path.is_file():
        try:
            return LatencyCurve({int(k): float(v) for k, v in json.loads(path.read_text()).items()})
        except (ValueError, json.JSONDecodeError):
            pass
    curve = measure_latency(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(curve.to_json()))
        os.replace(tmp, path)
    except OSError:
        pass
    return curve
