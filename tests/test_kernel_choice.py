"""kernels="auto" by measurement (dllm_spec/kernel_choice.py): the decision rule never picks a path
slower than stock, the choice is cached per machine/dtype/threads/shapes, a dtype oneDNN cannot pack
here stays on the stock path."""

from __future__ import annotations

import torch

from dllm_spec import kernel_choice
from dllm_spec.kernels import packing_supported
from tests.conftest import tiny_llama


def test_packed_is_chosen_only_when_faster_at_one_row_and_not_slower_at_sixteen():
    fast = {"default": {1: 10.0, 16: 20.0}, "packed": {1: 5.0, 16: 19.0}}
    assert kernel_choice.decide(fast) == "packed"
    assert (
        kernel_choice.decide({"default": {1: 10.0, 16: 20.0}, "packed": {1: 9.8, 16: 10.0}}) == "default"
    )  # within the margin
    assert (
        kernel_choice.decide({"default": {1: 10.0, 16: 20.0}, "packed": {1: 5.0, 16: 21.0}}) == "default"
    )  # slower at 16


def test_the_choice_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_measure(shapes, dtype, repeats=7):
        calls.append(dtype)
        return {"default": {1: 1.0, 16: 2.0}, "packed": {1: 0.5, 16: 1.0}}

    monkeypatch.setattr(kernel_choice, "measure", fake_measure)
    model = tiny_llama(0)
    assert kernel_choice.choose_kernels(model, tmp_path) == "packed"
    assert kernel_choice.choose_kernels(model, tmp_path) == "packed" and calls == [torch.float32]
    (cached,) = (tmp_path / "kernels").glob("*.json")
    cached.write_text("null")  # a corrupt cache is measured again
    assert kernel_choice.choose_kernels(model, tmp_path) == "packed" and len(calls) == 2


def test_a_dtype_that_cannot_be_packed_here_stays_stock(tmp_path):
    half = tiny_llama(0).to(torch.float16)
    assert kernel_choice.choose_kernels(half, tmp_path) == "default"
    bf16 = tiny_llama(0).to(torch.bfloat16)
    if not packing_supported(torch.bfloat16):
        assert kernel_choice.choose_kernels(bf16, tmp_path) == "default"


def test_a_real_measurement_returns_timings_for_both_paths():
    timings = kernel_choice.measure(kernel_choice.linear_shapes(tiny_llama(0)), torch.float32, repeats=3)
    assert set(timings) == {"default", "packed"} and all(t[r] > 0 for t in timings.values() for r in kernel_choice.ROWS)
