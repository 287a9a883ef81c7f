"""The target's measured latency: seconds for one cached forward over k tokens per row with b rows,
on the running device/dtype. Each row count is measured once (seconds), cached on disk per
model/device/dtype/threads, and refreshed online from the verify times the loop observes.

:class:`LatencyCurve` is one row count's k -> seconds; :class:`LatencySurface` holds one curve per
measured row count (1, 2, 4, 8, ...) and interpolates between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from dllm_spec.target import cache_root, warn_once
from dllm_spec.verify.kv_cache import StaticKVCache

DEFAULT_POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
#: tokens per row measured for batches of several rows (a batch verifies fewer drafts per row)
BATCH_POINTS = (1, 2, 3, 4, 6, 8, 12, 17)


class LatencyCurve:
    """Piecewise-linear seconds(k) through measured points; ``observe`` folds in live timings (EMA)."""

    def __init__(self, points: dict[int, float], momentum: float = 0.7) -> None:
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
        """Fold a live timing of a k-token forward into the curve (EMA). A k that was not measured
        becomes a point of its own, starting from the interpolated value: the lengths the loop
        actually verifies, at the contexts it actually runs, are the ones that matter."""
        if k <= 0 or seconds <= 0:
            return
        if k not in self.points:
            self.points[k] = self(k)
            self.points = dict(sorted(self.points.items()))
        self.points[k] = self.momentum * self.points[k] + (1 - self.momentum) * seconds

    def to_json(self) -> dict:
        return {str(k): v for k, v in self.points.items()}


class LatencySurface:
    """seconds(k, rows): one :class:`LatencyCurve` per measured row count, linear in between.

    ``model``: when given, row counts not measured yet are measured on first use (:meth:`ensure`) and
    cached on disk; without one, the nearest measured row count stands in (tests, user curves).
    """

    def __init__(
        self,
        curves: dict[int, LatencyCurve],
        model: PreTrainedModel | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if not curves:
            raise ValueError("a latency surface needs at least one curve")
        self.curves = dict(sorted(curves.items()))
        self.model = model
        self.cache_dir = cache_dir
        self._drift: dict[int, tuple[float, int]] = {}  # rows -> (EMA of live / predicted seconds, timings seen)
        self.remeasured = 0  # curves measured again because live timings disagreed
        self.stale: set[int] = set()  # row counts whose curve live timings disagree with (measured at the next ensure)
        self._measured_again: set[int] = set()  # row counts already measured again in this process

    def ensure(self, rows: int) -> None:
        """Measure the row counts bracketing ``rows`` (powers of two) when a model is attached, and
        measure again any curve that live timings found stale."""
        if self.model is None:
            return
        for stale in sorted(self.stale):
            self.curves[stale] = measure_and_cache(self.model, self.cache_dir, stale)
            self._drift[stale] = (1.0, 0)
            self._measured_again.add(stale)
            self.remeasured += 1
        self.stale.clear()
        if rows in self.curves:
            return
        bucket = 1
        while bucket < rows:
            bucket *= 2
        for b in {bucket // 2 if bucket > 1 else 1, bucket}:
            if b not in self.curves:
                self.curves[b] = load_or_measure(self.model, self.cache_dir, rows=b)
        self.curves = dict(sorted(self.curves.items()))

    def curve(self, rows: int) -> LatencyCurve:
        return self.curves.get(rows) or self.curves[min(self.curves, key=lambda b: abs(b - rows))]

    def __call__(self, k: int, rows: int = 1) -> float:
        if rows in self.curves:
            return self.curves[rows](k)
        below = [b for b in self.curves if b < rows]
        above = [b for b in self.curves if b > rows]
        if not above:  # past the largest measured batch: assume cost grows with the rows (compute-bound)
            top = max(below)
            return self.curves[top](k) * rows / top
        if not below:
            return self.curves[min(above)](k)
        lo, hi = max(below), min(above)
        w = (rows - lo) / (hi - lo)
        return (1 - w) * self.curves[lo](k) + w * self.curves[hi](k)

    #: a curve that live timings run this much faster than (EMA of live / predicted below
    #: 1 / STALE_RATIO: it was measured while the machine was busy) is measured again
    STALE_RATIO = 1.35
    #: ... or this much slower than: far past what long contexts cost (at 16 rows and 1K-token
    #: contexts a step takes 2-2.5x the 128-token curve, and measuring again would change nothing)
    WRONG_RATIO = 4.0

    def observe(self, k: int, seconds: float, rows: int = 1) -> None:
        """Fold a live timing into the curve of ``rows``; track how far live timings run from the
        curve, and when they disagree persistently (faster: a curve measured while the machine was
        busy; far slower: a wrong curve) mark it stale: the next :meth:`ensure` (the
        start of the next generation) measures it again and re-caches it, once per row count and
        process. Live timings up to ``WRONG_RATIO`` slower are what long contexts cost: measuring
        again (~10 s at 16 rows) would give the same curve, so they are only folded in."""
        if rows not in self.curves:
            return
        predicted = self.curves[rows](k)
        ratio = seconds / predicted if predicted > 0 else 1.0
        ema, count = self._drift.get(rows, (1.0, 0))
        ema = 0.9 * ema + 0.1 * ratio
        count += 1
        self._drift[rows] = (ema, count)
        disagrees = count >= 20 and not 1 / self.STALE_RATIO < ema < self.WRONG_RATIO
        if disagrees and self.model is not None and rows not in self._measured_again:
            # measured again by the next ensure(), never inside a generation; once only: a curve that
            # still disagrees after that is off for a lasting reason (long contexts cost more than the
            # measured 128-token one), which the live timings folded into it already track
            self.stale.add(rows)
        self.curves[rows].observe(k, seconds)


#: bumped when the engine's kernels change what a forward costs, so curves cached before are not reused
CURVE_FORMAT = 3


def _key(model: PreTrainedModel, rows: int) -> str:
    cfg = model.config
    ident = f"{getattr(cfg, '_name_or_path', '')}|{cfg.model_type}|{cfg.hidden_size}|{cfg.num_hidden_layers}|{cfg.vocab_size}"
    dev = model.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{torch.get_num_threads()}"
    suffix = ("" if rows == 1 else f"|rows{rows}") + f"|{getattr(model, 'dllm_kernels', 'default')}"
    return hashlib.sha1(f"{ident}|{name}|{model.dtype}|static{suffix}|v{CURVE_FORMAT}".encode()).hexdigest()[:16]


@torch.inference_mode()
def measure_latency(
    model: PreTrainedModel,
    points: tuple[int, ...] = DEFAULT_POINTS,
    context: int = 128,
    repeats: int = 3,
    rows: int = 1,
) -> LatencyCurve:
    """Time cached forwards of k tokens per row over ``rows`` rows after a ``context``-token prefix
    (median of ``repeats`` passes over every k, after one warm-up pass), through the same
    position-indexed cache and mask the verifier uses."""
    device = model.device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, context + max(points)), generator=torch.Generator().manual_seed(0)).to(device)
    cache = StaticKVCache.for_model(model, rows, capacity=context + max(points))
    cache.add_rows(rows)

    def forward(feed: torch.Tensor) -> None:
        n = feed.shape[1]
        cache.plan(n)
        mask = cache.attention_mask(torch.ones((n, n), dtype=torch.bool, device=device).tril(), model.dtype)
        model(
            input_ids=feed,
            cache=cache,
            use_cache=True,
            attention_mask=mask,
            position_ids=cache.positions(torch.arange(n, device=device)),
        )

    forward(ids[:, :context])
    cache.advance([context] * rows)
    runs: dict[int, list[float]] = {k: [] for k in points}
    for rep in range(
        repeats + 1
    ):  # round-robin over k, so a slow spell of the machine hits every k alike; pass 0 warms up
        for k in points:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            forward(ids[:, context : context + k])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                runs[k].append(time.perf_counter() - t0)
            cache.advance([0] * rows)
    timings = {k: sorted(r)[len(r) // 2] for k, r in runs.items()}
    return LatencyCurve(timings)


def load_or_measure(model: PreTrainedModel, cache_dir: str | os.PathLike | None = None, rows: int = 1) -> LatencyCurve:
    """The cached curve for this model/device/dtype and row count, measuring (and caching) it when
    missing; a corrupt cache file (not a JSON object of positive timings) is said and measured again."""
    path = _path(model, cache_dir, rows)
    if path.is_file():
        curve = _read_curve(path)
        if curve is not None:
            return curve
        warn_once(f"corrupt:{path}", f"the latency cache {path} is corrupt; measuring it again")
    return measure_and_cache(model, cache_dir, rows)


def _read_curve(path: Path) -> LatencyCurve | None:
    """The curve stored in ``path``, or None when the file does not hold one."""
    try:
        data = json.loads(path.read_text())
        return LatencyCurve({int(k): float(v) for k, v in data.items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _path(model: PreTrainedModel, cache_dir: str | os.PathLike | None, rows: int) -> Path:
    return Path(cache_dir or cache_root() / "latency") / f"{_key(model, rows)}.json"


def measure_and_cache(
    model: PreTrainedModel, cache_dir: str | os.PathLike | None = None, rows: int = 1
) -> LatencyCurve:
    """Measure the curve of ``rows`` (median of 7 round-robin passes) and write it to the cache."""
    path = _path(model, cache_dir, rows)
    print(
        f"dllm-spec: measuring the target's forward latency for {rows} row{'s' if rows > 1 else ''} "
        f"(once per model, device and dtype; up to a minute or two; cached in {path.parent})",
        file=sys.stderr,
    )
    curve = measure_latency(model, DEFAULT_POINTS if rows == 1 else BATCH_POINTS, rows=rows, repeats=7)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(curve.to_json()))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warn_once(
            f"unwritable:{path.parent}",
            f"cannot write the latency cache {path.parent} ({exc.strerror or exc}); "
            "the latency is measured again on every run until it can be written",
        )
    return curve
