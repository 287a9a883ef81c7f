"""Benchmark peers (dllm_spec/bench/peers.py): the llama.cpp peer decodes from the same prompt ids,
stops like this library (stop id emitted, then stop; max_new_tokens exact; ignore_eos; it has
no min_new_tokens), and asks for its package by name when it is missing."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dllm_spec.bench.peers import LlamaCppPeer, build_peer


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
        build_peer("sglang", None)


def test_the_study_runs_the_llama_cpp_peer_and_transformers_plain_generate(
    fake_llama_cpp, target, tmp_path, monkeypatch
):
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.bench.study import StudyConfig, run_study
    from dllm_spec.drafters import NullDrafter
    from dllm_spec.jsonl import read_records
    from dllm_spec.prompt import Prompt
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
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.bench import peers, speed
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
    result = speed.run_bench(
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


# ---- vLLM: the worker runs in a fake venv whose "python" puts a fake vllm package first -----------
FAKE_VLLM = '''
import json, os, signal
from types import SimpleNamespace

if os.environ.get("FAKE_VLLM_BROKEN"):
    raise ImportError("libtorch_cpu.so: cannot open shared object file")
__version__ = "0.0-fake"


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, ignore_eos=False, stop_token_ids=None):
        self.max_tokens, self.ignore_eos, self.stop_token_ids = max_tokens, ignore_eos, stop_token_ids


def continuation(ids, params):
    """A fixed greedy continuation of ``ids``, cut like vLLM: max_tokens, a stop id (emitted)."""
    out = []
    for j in range(params.max_tokens):
        out.append((sum(ids) + 3 * j) % 40 + 2)
        if out[-1] in (params.stop_token_ids or ()):
            break
    return out


class Engine:
    """Finishes the oldest request in flight per step; records the most in flight and every request."""

    def __init__(self, llm):
        self.llm, self.queue, self.most = llm, [], 0

    def add_request(self, rid, prompt, params):
        self.queue.append((rid, prompt["prompt_token_ids"], params))
        self.most = max(self.most, len(self.queue))
        return rid + "-internal"

    def step(self):
        self.llm.steps += 1
        if self.llm.crash_at and self.llm.steps >= self.llm.crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        rid, ids, params = self.queue.pop(0)
        tokens = continuation(ids, params)
        self.llm.drafts += len(tokens) // 2 if self.llm.spec else 0
        with open(os.environ["FAKE_VLLM_TRACE"], "a") as fh:
            fh.write(json.dumps(dict(spec=self.llm.spec, in_flight=self.most, prompt=ids)) + "\\n")
        return [SimpleNamespace(request_id=rid, finished=True, outputs=[SimpleNamespace(token_ids=tokens)])]


class LLM:
    def __init__(self, model, speculative_config=None, max_num_seqs=1, **kwargs):
        if not os.path.isdir(model):
            raise ValueError(f"no model at {model}\\nsecond line")
        self.spec = speculative_config is not None
        self.crash_at = int(os.environ.get("FAKE_VLLM_CRASH_AT", "0")) if self.spec else 0
        self.steps = self.drafts = 0
        self.llm_engine = Engine(self)

    def generate(self, prompts, params, use_tqdm=True):
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=continuation(p["prompt_token_ids"], params))]) for p in prompts]

    def get_metrics(self):
        return [SimpleNamespace(name="vllm:spec_decode_num_drafts", labels={}, value=self.drafts)]
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A venv whose python runs this Python with a fake ``vllm`` first on its path; the engine's trace
    (one line per finished request) goes to ``tmp_path/trace.jsonl``."""
    import os

    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (tmp_path / "target").mkdir()
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "scratch"))  # the peers' logs
    monkeypatch.setenv("FAKE_VLLM_TRACE", str(tmp_path / "trace.jsonl"))
    monkeypatch.delenv("FAKE_VLLM_CRASH_AT", raising=False)
    monkeypatch.delenv("FAKE_VLLM_BROKEN", raising=False)
    assert os.access(python, os.X_OK)
    return tmp_path


def _vllm_options(root, **kwargs):
    from dllm_spec.bench.peers import VllmOptions

    defaults = dict(venv=str(root / "venv"), target=str(root / "target"), drafter=str(root / "target"))
    return VllmOptions(**{**defaults, **kwargs})


def _bench_with_vllm(target, vllm, prompts=3):
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.bench import speed
    from dllm_spec.drafters import PromptLookupDrafter
    from dllm_spec.prompt import Prompt
    from tests.conftest import CharTokenizer

    spec = DiffusionSpeculator(target, CharTokenizer(), PromptLookupDrafter())
    return speed.run_bench(
        spec,
        ["prompt-lookup"],
        [Prompt(str(i), "c", f"prompt {i}") for i in range(prompts)],
        max_new_tokens=5,
        repeats=1,
        peers=("vllm",),
        default_policy="fixed:2",
        ignore_eos=True,
        vllm=vllm,
    )


def test_vllm_runs_beside_ours_from_the_same_ids_and_its_crash_is_reported(target, fake_vllm, monkeypatch):
    """Both vLLM variants start (load time reported apart); the drafter one segfaults on its second
    prompt: it is reported as failed with its signal and the end of its log, the rest is kept."""
    import json

    from tests.conftest import CharTokenizer

    monkeypatch.setenv("FAKE_VLLM_CRASH_AT", "2")
    result = _bench_with_vllm(target, _vllm_options(fake_vllm, k=3))
    assert "killed by SIGSEGV" in result["failed"]["vllm+dflash@3"] and "vllm" not in result["failed"]
    setup = result["peer_setup"]
    assert setup["vllm"]["status"] == "ok" and setup["vllm"]["vllm"] == "0.0-fake"
    assert setup["vllm"]["load_s"] >= 0 and setup["vllm"]["startup_s"] >= setup["vllm"]["load_s"]
    assert setup["vllm+dflash@3"]["status"] == "failed" and setup["vllm+dflash@3"]["k"] == 3
    runs = [(r["drafter"], r["prompt_id"]) for r in result["records"]]
    assert sum(d == "vllm" for d, _ in runs) == 3 and sum(d == "vllm+dflash@3" for d, _ in runs) == 1
    assert {p for d, p in runs if d in ("none", "prompt-lookup")} == {"0", "1", "2"}
    assert set(result["summary"]) == {"none", "prompt-lookup", "vllm", "vllm+dflash@3"}
    trace = [json.loads(line) for line in (fake_vllm / "trace.jsonl").read_text().splitlines()]
    chat = CharTokenizer()
    assert [t["prompt"] for t in trace if not t["spec"]] == [chat(f"prompt {i}")["input_ids"] for i in range(3)]
    rec = next(r for r in result["records"] if r["drafter"] == "vllm+dflash@3")
    assert rec["new_tokens"] == 5 and rec["tau"] == pytest.approx(5 / (1 + 2))  # prefill + 2 drafts (the fake's)


def test_a_missing_venv_or_vllm_that_does_not_import_or_load_fails_those_variants_only(target, fake_vllm, monkeypatch):
    result = _bench_with_vllm(target, _vllm_options(fake_vllm, venv=str(fake_vllm / "nowhere")), prompts=1)
    assert set(result["failed"]) == {"vllm", "vllm+dflash@3"}
    assert "no " + str(fake_vllm / "nowhere" / "bin" / "python") in result["failed"]["vllm"]
    assert {r["drafter"] for r in result["records"]} == {"none", "prompt-lookup"}
    assert result["peer_setup"]["vllm"] == {"status": "failed", "reason": result["failed"]["vllm"]}

    monkeypatch.setenv("FAKE_VLLM_BROKEN", "1")
    result = _bench_with_vllm(target, _vllm_options(fake_vllm), prompts=1)
    assert "cannot import vllm" in result["failed"]["vllm"] and "libtorch_cpu.so" in result["failed"]["vllm"]
    assert {r["drafter"] for r in result["records"]} == {"none", "prompt-lookup"}

    monkeypatch.delenv("FAKE_VLLM_BROKEN")
    result = _bench_with_vllm(target, _vllm_options(fake_vllm, target=str(fake_vllm / "gone")), prompts=1)
    assert "vLLM could not load the model: ValueError: no model at" in result["failed"]["vllm"]
    assert "\n" not in result["failed"]["vllm"]


def test_vllm_in_the_throughput_bench_keeps_batch_requests_in_flight(target, fake_vllm):
    import json

    from dllm_spec import DiffusionSpeculator, SpeculatorConfig
    from dllm_spec.bench.throughput import run_throughput
    from dllm_spec.drafters import NullDrafter
    from tests.conftest import CharTokenizer

    spec = DiffusionSpeculator(target, CharTokenizer(), NullDrafter(), SpeculatorConfig(max_batch_size=4))
    result = run_throughput(
        spec, {}, ["abcabc", "hello", "xyz"], [1, 2], max_new_tokens=4, vllm=_vllm_options(fake_vllm)
    )
    by = {(r["batch"], r["variant"]): r for r in result["records"]}
    assert {v for _, v in by} == {"transformers", "plain", "vllm", "vllm+dflash@3"} and not result["failed"]
    assert by[(2, "vllm")]["new_tokens"] == 12 and by[(2, "vllm")]["tau"] == 1.0
    trace = [json.loads(line) for line in (fake_vllm / "trace.jsonl").read_text().splitlines()]
    plain = [t["in_flight"] for t in trace if not t["spec"]]
    assert plain[:3] == [1, 1, 1] and plain[3:] == [2, 2, 2]  # batch 1, then 2 in flight (the most so far)
    assert result["peer_setup"]["vllm"]["max_num_seqs"] == 2


def test_the_vllm_worker_imports_nothing_but_the_standard_library_and_vllm():
    """It runs in the vLLM venv, whose transformers cannot load this library."""
    import ast
    from pathlib import Path

    import dllm_spec.bench

    tree = ast.parse((Path(dllm_spec.bench.__file__).parent / "vllm_worker.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    roots = {m.split(".")[0] for m in modules}
    assert roots - set(sys.stdlib_module_names) == {"vllm"}, roots


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--peers", "vllm", "--vllm-venv", "/nonexistent/venv"], "vllm peer needs a venv.*--vllm-venv"),
        (["--peers", "vllm", "--vllm-k", "0"], "--vllm-k"),
        (["--peers", "vllm", "--temperature", "0.7"], "greedily"),
        (["--peers", "llama.cpp", "--batch-sizes", "1,2"], "vllm only"),
    ],
)
def test_bench_peers_arguments_end_with_one_line_before_any_work(capsys, monkeypatch, argv, message):
    import re

    from dllm_spec import cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and re.search(message, err), err
