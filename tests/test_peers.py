"""Benchmark peers (dllm_spec/peers.py): the llama.cpp peer decodes from the same prompt ids,
stops like this library (stop id emitted, then stop; max_new_tokens exact; ignore_eos; it has
no min_new_tokens), and asks for its package by name when it is missing."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dllm_spec.peers import LlamaCppPeer, build_peer


class FakeLlama:
    """Stands in for llama_cpp.Llama: echoes a fixed continuation, recording what it was given."""

    seen: list[list[int]] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def reset(self) -> None:
        pass

    def generate(self, tokens, **kwargs):
        FakeLlama.seen.append(list(tokens))
        assert kwargs["temp"] == 0.0 and kwargs["top_k"] == 1 and kwargs["repeat_penalty"] == 1.0
        yield from [5, 6, 2, 7, 8, 9, 10, 11]


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    FakeLlama.seen = []


def test_the_llama_cpp_peer_stops_like_the_library(fake_llama_cpp, tmp_path):
    peer = LlamaCppPeer(
        lambda prompt: torch.tensor([[0, 3, 4]]), frozenset({2}), gguf_path=tmp_path / "m.gguf", threads=2
    )
    out = peer.generate("hi", max_new_tokens=6)
    assert FakeLlama.seen == [[0, 3, 4]] and out.token_ids.tolist() == [[5, 6, 2]]  # the stop id is emitted
    assert out.stats.new_tokens == 3 and out.stats.tau == 1.0 and out.stats.wall_time_s >= 0
    assert peer.generate("hi", max_new_tokens=6, ignore_eos=True).token_ids.tolist() == [[5, 6, 2, 7, 8, 9]]
    with pytest.raises(ValueError, match="ignore_eos"):
        peer.generate("hi", min_new_tokens=4)
    with pytest.raises(ValueError, match="greedy"):
        peer.generate("hi", temperature=0.7)


def test_a_missing_llama_cpp_names_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(ValueError, match="pip install llama-cpp-python"):
        LlamaCppPeer(lambda p: torch.tensor([[0]]), frozenset())
    with pytest.raises(ValueError, match="unknown peer"):
        build_peer("vllm", None)


def test_the_study_runs_the_llama_cpp_peer_and_transformers_plain_generate(
    fake_llama_cpp, target, tmp_path, monkeypatch
):
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.drafters import NullDrafter
    from dllm_spec.jsonl import read_records
    from dllm_spec.prompt import Prompt
    from dllm_spec.study import StudyConfig, run_study
    from tests.conftest import CharTokenizer

    monkeypatch.setattr("dllm_spec.target.default_gguf_dir", lambda: tmp_path)
    spec = DiffusionSpeculator(target, CharTokenizer(), NullDrafter())
    cfg = StudyConfig(
        lengths=(4,),
        drafters=(),
        policies=(),
        temperatures=(0.0,),
        peers=("hf-generate", "llama.cpp"),
        repeats=1,
        ignore_eos=True,
    )
    out = run_study(spec, [Prompt("a", "code", "abcabc")], cfg, tmp_path / "study")
    rows = {r["variant"]: r for r in read_records(out / "records.jsonl")}
    assert set(rows) == {"none", "hf-generate", "llama.cpp"}
    assert rows["llama.cpp"]["new_tokens"] == 4 and rows["hf-generate"]["new_tokens"] == 4


FAKE_PEERS = '''
import os, signal


class EchoThenSegfault:
    """Answers its first request (the prompt's first ids), then kills its own process with SIGSEGV."""

    def __init__(self, crash_at=2):
        self.calls, self.crash_at = 0, crash_at

    def generate_ids(self, ids, max_new_tokens, ignore_eos):
        self.calls += 1
        if self.calls >= self.crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        return ids[:max_new_tokens]
'''


def test_a_crashing_peer_is_reported_with_its_signal_and_the_other_results_are_kept(target, tmp_path, monkeypatch):
    """The peer runs in a child process: a segfault there ends that variant, not the bench."""
    from dllm_spec import DiffusionSpeculator, bench, peers
    from dllm_spec.drafters import PromptLookupDrafter
    from dllm_spec.prompt import Prompt
    from tests.conftest import CharTokenizer

    (tmp_path / "fake_peers.py").write_text(FAKE_PEERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        peers,
        "build_peer",
        lambda name, spec, isolated=False: peers.PeerProcess(name, spec.encode, "fake_peers:EchoThenSegfault", {}),
    )
    spec = DiffusionSpeculator(target, CharTokenizer(), PromptLookupDrafter())
    result = bench.run_bench(
        spec,
        ["prompt-lookup"],
        [Prompt(str(i), "c", f"prompt {i}") for i in range(3)],
        max_new_tokens=4,
        repeats=1,
        peers=("llama.cpp",),
        default_policy="fixed:2",
    )
    assert "killed by SIGSEGV" in result["failed"]["llama.cpp"]
    runs = [(r["drafter"], r["prompt_id"]) for r in result["records"]]
    assert (
        runs.count(("llama.cpp", "0")) == 1 and sum(d == "llama.cpp" for d, _ in runs) == 1
    )  # its one run before the crash
    assert {p for d, p in runs if d in ("none", "prompt-lookup")} == {"0", "1", "2"} and len(runs) == 7
    assert set(result["summary"]) == {"none", "prompt-lookup", "llama.cpp"}
