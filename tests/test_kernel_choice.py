"""kernels="auto" by measurement (dllm_spec/kernel_choice.py): the decision rule never picks a path
slower than stock, the choice is cached per machine/dtype/threads/shapes, a dtype oneDNN cannot pack
here stays on the stock path."""

from __future__ import annotations

import torch

from dllm_spec import kernel_choice
from dllm_spec.kernels import packing_supported
from tests.conftest import tiny_llama


def _timings(stock: list[float], packed: list[float]) -> dict[str, dict[int, float]]:
    return {"default": dict(zip(kernel_choice.ROWS, stock)), "packed": dict(zip(kernel_choice.ROWS, packed))}


def test_packed_is_chosen_from_the_fewest_rows_at_which_it_wins_there_and_beyond():
    assert kernel_choice.ROWS == (1, 2, 4, 8, 16)
    assert kernel_choice.decide(_timings([10, 11, 12, 14, 20], [5, 6, 7, 8, 18])) == 1  # wins everywhere
    assert kernel_choice.decide(_timings([10, 11, 12, 14, 20], [12, 12, 10, 9, 10])) == 4  # an AVX2 CPU
    assert kernel_choice.decide(_timings([10, 11, 12, 14, 20], [5, 6, 7, 8, 21])) is None  # slower at 16
    assert kernel_choice.decide(_timings([10, 11, 12, 14, 20], [9.8, 6, 7, 8, 10])) == 2  # within the margin at 1
    assert kernel_choice.decide(_timings([10, 11, 12, 14, 20], [5, 12, 7, 8, 10])) == 4  # a loss at 2 cuts below


def test_the_choice_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_measure(shapes, dtype, repeats=7):
        calls.append(dtype)
        return _timings([1, 1, 1.2, 1.5, 2], [1.1, 1.1, 1.0, 0.9, 1.0])

    monkeypatch.setattr(kernel_choice, "measure", fake_measure)
    model = tiny_llama(0)
    assert kernel_choice.choose_kernels(model, tmp_path) == ("packed", 4)
    assert kernel_choice.choose_kernels(model, tmp_path) == ("packed", 4) and calls == [torch.float32]
    (cached,) = (tmp_path / "kernels").glob("*.json")
    cached.write_text("null")  # a corrupt cache is measured again
    assert kernel_choice.choose_kernels(model, tmp_path) == ("packed", 4) and len(calls) == 2
    cached.write_text('{"choice": "packed"}')  # a cache of another version (no threshold) too
    assert kernel_choice.choose_kernels(model, tmp_path) == ("packed", 4) and len(calls) == 3


def test_a_dtype_that_cannot_be_packed_here_stays_stock(tmp_path):
    half = tiny_llama(0).to(torch.float16)
    assert kernel_choice.choose_kernels(half, tmp_path) == ("default", 1)
    bf16 = tiny_llama(0).to(torch.bfloat16)
    if not packing_supported(torch.bfloat16):
        assert kernel_choice.choose_kernels(bf16, tmp_path) == ("default", 1)


def test_a_real_measurement_returns_timings_for_both_paths():
    timings = kernel_choice.measure(kernel_choice.linear_shapes(tiny_llama(0)), torch.float32, repeats=3)
    assert set(timings) == {"default", "packed"} and all(t[r] > 0 for t in timings.values() for r in kernel_choice.ROWS)
