"""Bad or edge input, as a hostile but realistic user gives it: every case is a clear error that
names the argument or file, raised before any work, and nothing is lost. One table per surface:
the Python API, configs and specs, files, and the CLI (exit status 2 with one line, no traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dllm_spec import DiffusionSpeculator, SpeculatorConfig
from dllm_spec.drafters import PromptLookupDrafter, build_drafter
from dllm_spec.policy import CostAwarePolicy, FixedLength, build_policy
from dllm_spec.prompt import Prompt
from tests.conftest import VOCAB, tiny_llama

IDS = torch.tensor([[0, 5, 9, 14]])


@pytest.fixture(scope="module")
def spec():
    return DiffusionSpeculator(
        tiny_llama(0), None, PromptLookupDrafter(), policy=FixedLength(2), config=SpeculatorConfig(max_batch_size=4)
    )


# ---- generate(): (keyword arguments or prompt, message fragment) --------------------------------
GENERATE_CASES = [
    (dict(max_new_tokens=5.5), "max_new_tokens"),
    (dict(max_new_tokens=8.0), "max_new_tokens"),
    (dict(max_new_tokens="10"), "max_new_tokens"),
    (dict(max_new_tokens=None), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k="3"), "top_k"),
    (dict(seed="abc"), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2**70), "seed"),
    (dict(seed=-1), "seed"),
    (dict(temperature="0.7"), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p="0.9"), "top_p"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(min_new_tokens=5.0), "min_new_tokens"),
    (dict(min_new_tokens=50, max_new_tokens=10), "min_new_tokens"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(stop_token_ids=[10**6]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
]


@pytest.mark.parametrize("kwargs,message", GENERATE_CASES)
def test_generate_rejects_a_bad_argument_by_name(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spec.generate(IDS, **kwargs)


PROMPT_CASES = [
    (torch.zeros((1, 2, 3), dtype=torch.long), "shape"),
    (torch.tensor(3), "shape"),
    (torch.tensor([[0.0, 1.0]]), "integer"),
    (torch.tensor([[True, False]]), "integer"),
    (torch.tensor([[0, VOCAB + 5]]), "vocabulary"),
    (torch.tensor([[0, -2]]), "vocabulary"),
    (torch.zeros((1, 0), dtype=torch.long), "empty"),
    (torch.zeros((1, 256), dtype=torch.long), "prompt too long"),
    ([0, 1.5], "prompt"),
    (None, "prompt must be"),
    (42, "prompt must be"),
    ("a string", "no tokenizer"),
    ([], "empty"),
    (torch.zeros((5, 3), dtype=torch.long), "max_batch_size"),
    ([torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)], "prompt 1: empty"),
    ([torch.tensor([0, 2]), torch.tensor([0, VOCAB])], "prompt 1: .*vocabulary"),
]


@pytest.mark.parametrize("prompt,message", PROMPT_CASES)
def test_generate_rejects_a_bad_prompt_with_a_clear_message(spec, prompt, message):
    with pytest.raises(ValueError, match=message):
        spec.generate(prompt, max_new_tokens=2)


def test_batch_arguments_are_checked(spec):
    ids = torch.tensor([[0, 2], [0, 3]])
    with pytest.raises(ValueError, match="attention_mask .* must match"):
        spec.generate(ids, attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="row 1 .* empty"):
        spec.generate(ids, attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="attention_mask goes with input_ids"):
        spec.generate([torch.tensor([0, 2])] * 2, attention_mask=torch.ones((2, 2)))
    with pytest.raises(ValueError, match="streamer"):
        spec.generate([torch.tensor([0, 2])] * 2, streamer=object())
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        list(spec.generate_iter([torch.tensor([0, 2])] * 2, seeds=[1]))


def test_edge_inputs_that_are_fine_work(spec):
    """Not errors: uint8 / int16 ids, a plain list of ints, a 1-D tensor, a row of one token."""
    want = spec.generate(IDS, max_new_tokens=4).token_ids
    for prompt in (IDS.to(torch.uint8), IDS.to(torch.int16), IDS[0].tolist(), IDS[0]):
        assert torch.equal(spec.generate(prompt, max_new_tokens=4).token_ids, want)
    assert spec.generate(torch.tensor([[7]]), max_new_tokens=3).token_ids.shape == (1, 3)


# ---- configs, policies, drafter specs -------------------------------------------------------------
def _bad_dtype():
    from dllm_spec.target import resolve_dtype

    resolve_dtype("float64x", torch.device("cpu"))


def _bad_kernels():
    from dllm_spec.kernels import apply_kernels

    apply_kernels(tiny_llama(0), "fast")


def _tree_width_zero():
    from tests.conftest import make_drafter

    make_drafter(tiny_llama(0), tree_width=0)


def _vocab_mismatch():
    from dllm_spec.drafters import AutoregressiveDrafter

    DiffusionSpeculator(tiny_llama(0), None, AutoregressiveDrafter(tiny_llama(5, vocab=VOCAB + 16)))


CONFIG_CASES = [
    (lambda: SpeculatorConfig(block_size=-1), "block_size"),
    (lambda: SpeculatorConfig(verification="tree"), "verification"),
    (lambda: SpeculatorConfig(max_batch_size=0), "max_batch_size"),
    (lambda: SpeculatorConfig(max_batch_size=2.0), "max_batch_size"),
    (lambda: FixedLength(-1), "block length"),
    (lambda: CostAwarePolicy(max_k=0), "max_k"),
    (lambda: CostAwarePolicy(probe_every=0), "probe_every"),
    (lambda: PromptLookupDrafter(max_ngram=0), "min_ngram"),
    (lambda: build_drafter("nonsense", tiny_llama(0)), "unknown drafter"),
    (lambda: build_drafter("block-diffusion:tree=x", tiny_llama(0)), "options"),
    (lambda: build_drafter("prompt-lookup:x", tiny_llama(0)), "prompt-lookup:x.*positive integer"),
    (lambda: build_drafter("early-exit:abc", tiny_llama(0)), "early-exit:abc.*early-exit:N.*positive integer"),
    (lambda: build_policy("bogus"), "unknown policy"),
    (_tree_width_zero, "tree_width"),
    (_bad_dtype, "Unknown dtype"),
    (_bad_kernels, "kernels"),
    (_vocab_mismatch, "vocabulary mismatch"),
]


@pytest.mark.parametrize("make,message", CONFIG_CASES)
def test_bad_configs_and_specs_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- files ------------------------------------------------------------------------------------------
def _drafter_dir(tmp_path):
    from tests.conftest import make_drafter

    path = tmp_path / "drafter"
    make_drafter(tiny_llama(0)).save_pretrained(path)
    return path


def test_a_missing_drafter_directory_is_named(tmp_path):
    from dllm_spec.drafters import BlockDiffusionDrafter

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        BlockDiffusionDrafter.from_pretrained(tmp_path / "nowhere")


def test_a_corrupt_config_json_is_named(tmp_path):
    from dllm_spec.drafters import BlockDiffusionDrafter

    path = _drafter_dir(tmp_path)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json"):
        BlockDiffusionDrafter.from_pretrained(path)
    with pytest.raises(ValueError, match="config.json"):
        build_drafter(str(path), tiny_llama(0))


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from dllm_spec.drafters import BlockDiffusionDrafter

    path = _drafter_dir(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path}.*model.safetensors"):
        BlockDiffusionDrafter.from_pretrained(path)


def _drop_weights(path, *names):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    for name in names:
        weights.pop(name)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _nan_weight(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    weights["norm.weight"][0] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda p: _drop_weights(p, "fuse.weight", "norm.weight"),
            r"model\.safetensors lacks 2 .*fuse\.weight, norm\.weight",
        ),
        (_nan_weight, "norm.weight hold NaN"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json must hold a JSON object"),
        (lambda p: (p / "config.json").write_text('{"model_type": "llama"}'), "not a block-diffusion drafter.*'llama'"),
    ],
)
def test_an_incomplete_or_foreign_drafter_checkpoint_is_refused_at_load(tmp_path, damage, message):
    """Missing weights once loaded silently and failed later with an IndexError in generation."""
    from dllm_spec.drafters import BlockDiffusionDrafter

    path = _drafter_dir(tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=message):
        BlockDiffusionDrafter.from_pretrained(path)


def test_a_corrupt_converted_model_cache_is_rebuilt_and_a_full_disk_leaves_no_partial_copy(
    tmp_path, monkeypatch, capsys
):
    from safetensors import SafetensorError

    from dllm_spec import target as target_module

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / target_module.DEFAULT_GGUF_FILE).write_bytes(b"gguf")
    monkeypatch.setenv("DLLM_SPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(target_module, "default_gguf_dir", lambda: gguf)
    converted = target_module._converted_default_dir()
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"truncated")
    (converted / "CONVERTED_FROM").write_text(f"{gguf / target_module.DEFAULT_GGUF_FILE}:4")
    tiny = tiny_llama(0)

    class Tokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(target_module, "_convert_gguf", lambda d: (tiny, Tokenizer()))
    model, _ = target_module._load_default_raw()
    assert model is tiny and "converted-model cache" in capsys.readouterr().err  # said in one line, then rebuilt
    assert (converted / "model.safetensors").stat().st_size > 1000

    def full_disk(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tiny, "save_pretrained", full_disk)
    target_module._write_converted(tiny, Tokenizer(), tmp_path / "cache" / "other", "id")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left" in err[0]
    assert not list((tmp_path / "cache").glob("other*"))  # the partial copy is gone


def test_an_empty_dllm_spec_cache_is_unset(monkeypatch):
    from dllm_spec.target import cache_root

    monkeypatch.setenv("DLLM_SPEC_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "dllm-spec"


def test_a_missing_prompt_file_is_named(tmp_path):
    from dllm_spec.traces import read_prompts

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompts(tmp_path / "nope.jsonl")


# ---- the CLI: exit 2, one line, before any model is loaded ---------------------------------------------
def _cli(capsys, argv: list[str]) -> str:
    from dllm_spec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def _prompt_file(tmp_path) -> str:
    path = tmp_path / "in.txt"
    path.write_text("a prompt without a final newline")
    return str(path)


def _file(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


SHARD_RECORD = dict(
    prompt_id="p1", category="x", variant=0, temperature=0.0, prompt_ids=[0, 2, 3], response_ids=[4, 5, 6, 7]
)


def _data(tmp_path, content: bytes | None = None) -> str:
    """A distillation directory with one shard (default: one valid record, which is not held out)."""
    import gzip
    import json

    path = tmp_path / "data"
    path.mkdir(exist_ok=True)
    if content is None:
        content = gzip.compress((json.dumps(SHARD_RECORD) + "\n").encode())
    (path / "shard-00000.jsonl.gz").write_bytes(content)
    return str(path)


def _gz(text: str, cut: int | None = None) -> bytes:
    import gzip

    data = gzip.compress(text.encode())
    return data[:cut] if cut else data


def _run_with_config(tmp_path, **saved) -> str:
    """A run directory to resume: a checkpoint and the train_config.json it was trained with."""
    import json

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text("{}")
    (run / "train_config.json").write_text(json.dumps({"drafter": "block-diffusion", **saved}))
    return str(run)


def _model_dir(tmp_path) -> str:
    tiny_llama(0).save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


CLI_CASES = [
    (lambda t: ["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (lambda t: ["generate", "hi", "--temperature", "-1"], "temperature"),
    (lambda t: ["generate", "hi", "--top-p", "2"], "top_p"),
    (lambda t: ["generate", "  "], "empty prompt"),
    (lambda t: ["generate", "hi", "--threads", "-1"], "--threads"),
    (
        lambda t: (
            ["generate", "hi", "--device", "cuda:7"]
            if not torch.cuda.is_available()
            else ["generate", "hi", "--threads", "0"]
        ),
        "--device|--threads",
    ),
    (lambda t: ["generate", "hi", "--target", str(t / "no" / "such" / "dir")], "--target"),
    (lambda t: ["bench", "--repeats", "0"], "--repeats"),
    (lambda t: ["bench", "--max-new-tokens", "0"], "--max-new-tokens"),
    (lambda t: ["bench", "--out", str(t)], "is a directory"),
    (lambda t: ["bench", "--batch-sizes", "0,x"], "--batch-sizes"),
    (lambda t: ["bench", "--peers", "sglang"], "--peers"),
    (lambda t: ["bench", "--peers", "vllm", "--vllm-venv", str(t / "no-venv")], "--vllm-venv"),
    (lambda t: ["bench", "--peers", "llama.cpp", "--batch-sizes", "1"], "--peers"),
    (lambda t: ["bench", "--prompts", str(t / "missing.txt")], "missing.txt"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "in.txt")], "is the input file"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t)], "is a directory"),
    (lambda t: ["traces", str(t / "missing.jsonl"), "--out", str(t / "o.jsonl")], "missing.jsonl"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "o.jsonl"), "--temperature", "-2"], "temperature"),
    (
        lambda t: ["traces", _prompt_file(t), "--out", str(t / "o.jsonl"), "--batch-size", "0"],
        "batch-size|positive integer",
    ),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "o.jsonl"), "--min-new-tokens", "-1"], "min_new_tokens"),
    (lambda t: ["study", "--lengths", "abc"], "--lengths"),
    (lambda t: ["study", "--lengths", "0"], "lengths"),
    (lambda t: ["study", "--repeats", "0"], "repeats"),
    (lambda t: ["study", "--prompts", str(t / "missing.txt")], "missing.txt"),
    (lambda t: ["train", "--data", str(t / "nowhere"), "--out", str(t / "run")], "--data"),
    (lambda t: ["train", "--data", str(t), "--eval-data", str(t / "nowhere"), "--out", str(t / "run")], "--eval-data"),
    (lambda t: ["train", "--data", str(t), "--out", str(t / "run"), "--architecture", "eagle"], "architecture"),
    (lambda t: ["export", "block-diffusion", "--format", "gguf", "--out", str(t / "x")], "--format"),
    (
        lambda t: (
            ["export", "block-diffusion", "--format", "dflash", "--out", str(t)] if (t / "f").write_text("x") else []
        ),
        "not an empty directory",
    ),
    (lambda t: ["export", str(t / "nothing"), "--format", "dflash", "--out", str(t / "x")], "no drafter checkpoint"),
    (
        lambda t: ["export", "block-diffusion", "--format", "transformers", "--out", str(t / "x"), "--dtype", "int3"],
        "--dtype",
    ),
    (
        lambda t: ["export", "block-diffusion", "--format", "transformers", "--out", str(t / "x")],
        "cannot be exported.*architecture",
    ),
    # second hardening round
    (lambda t: ["traces", _prompt_file(t), "--out", _file(t, "n.txt", "notes\nmore")], "n.txt is not a traces file"),
    (
        lambda t: ["traces", _prompt_file(t), "--out", _file(t, "o.jsonl", '{"name": "x", "text": "y"}\n')],
        "o.jsonl is not a traces file",
    ),
    (lambda t: ["traces", _prompt_file(t), "--out", "/dev/null"], "/dev/null is not a regular file"),
    (
        lambda t: [
            "traces",
            _file(t, "s.jsonl", '{"id": "a", "prompt": "x", "system": 5}\n'),
            "--out",
            str(t / "o.jsonl"),
        ],
        r"s\.jsonl:1: prompt id 'a': 'system' must be a string",
    ),
    (lambda t: ["traces", "caf\udce9.txt", "--out", str(t / "o.jsonl")], "not valid UTF-8"),
    (lambda t: ["bench", "--out", "/dev/null"], "/dev/null is not a regular file"),
    (lambda t: ["bench", "--out", _file(t, "r.json", "{}")], "r.json exists: pass --overwrite"),
    (lambda t: ["bench", "--per-category", "0"], "--per-category"),
    (lambda t: ["generate", "caf\udce9"], "not valid UTF-8"),
    (
        lambda t: ["train", "--data", _data(t, b"not gzip"), "--out", str(t / "run")],
        "shard-00000.jsonl.gz: not a complete gzip",
    ),
    (
        lambda t: ["train", "--data", _data(t, _gz('{"a": 1}\n' * 200, cut=40)), "--out", str(t / "run")],
        "shard-00000.jsonl.gz: not a complete gzip",
    ),
    (
        lambda t: ["train", "--data", _data(t, _gz('{"prompt_id": "a"}\n')), "--out", str(t / "run")],
        "shard-00000.jsonl.gz:1: .*keys",
    ),
    (lambda t: ["train", "--data", _data(t), "--out", str(t / "run")], "no greedy held-out sequence"),
    (
        lambda t: ["train", "--data", _data(t), "--out", _run_with_config(t, num_layers=3, lr=1.0)],
        r"another config \(lr 1\.0 -> 0\.0006; num_layers 3 -> 2\)",
    ),
    (lambda t: ["export", _model_dir(t), "--format", "dllm", "--out", str(t / "x")], "not a block-diffusion drafter"),
    (
        lambda t: [
            "export",
            _file(t, "cfg/config.json", "[]") and str(t / "cfg"),
            "--format",
            "dllm",
            "--out",
            str(t / "x"),
        ],
        "must hold a JSON object",
    ),
]


@pytest.mark.parametrize("argv,message", CLI_CASES)
def test_every_cli_subcommand_exits_2_with_one_line(tmp_path, capsys, argv, message):
    import re

    line = _cli(capsys, argv(tmp_path))
    assert re.search(message, line), line


def test_traces_out_equal_to_the_input_loses_nothing(tmp_path, capsys):
    src = _prompt_file(tmp_path)
    _cli(capsys, ["traces", src, "--out", src])
    assert open(src).read() == "a prompt without a final newline"


def test_bench_with_an_unwritable_out_fails_before_running(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if shutil.which("id") and __import__("os").geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        line = _cli(capsys, ["bench", "--out", str(ro / "r.json")])
        assert "not writable" in line
    finally:
        ro.chmod(0o700)


def test_bench_json_is_written_as_each_prompt_finishes(spec, monkeypatch):
    from dllm_spec.bench import speed

    real = DiffusionSpeculator.generate
    # the tiny target has no tokenizer: the bench's string prompts become fixed input ids
    monkeypatch.setattr(DiffusionSpeculator, "generate", lambda self, prompt, **kwargs: real(self, IDS, **kwargs))
    calls = []
    speed.run_bench(
        spec,
        ["prompt-lookup"],
        [Prompt(str(i), "c", "p") for i in range(3)],
        max_new_tokens=2,
        repeats=1,
        on_result=lambda r: calls.append(len(r["records"])),
    )
    assert calls == [2, 4, 6]  # after every prompt: plain AR and the drafter


# ---- second hardening round: nothing lost, nothing shadowed --------------------------------------------
def test_traces_leaves_an_out_that_is_not_its_own_untouched(tmp_path, capsys):
    notes = tmp_path / "n.txt"
    notes.write_bytes(b"notes\nmore")
    _cli(capsys, ["traces", _prompt_file(tmp_path), "--out", str(notes)])
    assert notes.read_bytes() == b"notes\nmore"  # the last line was once cut off as a "torn record"


def _tiny_traces_spec(monkeypatch):
    from dllm_spec import DiffusionSpeculator
    from tests.conftest import CharTokenizer

    spec = DiffusionSpeculator(tiny_llama(0), CharTokenizer(), PromptLookupDrafter(), policy=FixedLength(2))
    monkeypatch.setattr(DiffusionSpeculator, "from_pretrained", classmethod(lambda cls, *a, **k: spec))


def test_traces_on_a_full_disk_says_so_in_one_line_and_keeps_what_finished(tmp_path, monkeypatch, capsys):
    import errno

    from dllm_spec import traces

    _tiny_traces_spec(monkeypatch)
    src = _file(tmp_path, "in.txt", "one\ntwo\nthree\n")
    real, calls = traces.append_record, []

    def full_disk(path, record):
        calls.append(record["id"])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, record)

    monkeypatch.setattr(traces, "append_record", full_disk)
    line = _cli(
        capsys, ["traces", src, "--out", str(tmp_path / "t.jsonl"), "--max-new-tokens", "3", "--batch-size", "1"]
    )
    assert "No space left on device" in line and "rerun to resume" in line
    assert traces.completed_ids(tmp_path / "t.jsonl") == {(calls[0], 0)}


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from dllm_spec import cli, traces

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupt)
    monkeypatch.setattr(traces, "read_prompts", interrupt)
    for argv in (
        ["bench", "--prompts", _prompt_file(tmp_path)],
        ["traces", _prompt_file(tmp_path), "--out", str(tmp_path / "t.jsonl")],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 130 and err.endswith("interrupted; rerun to resume") and "\n" not in err, err


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_hub_id_target_is_fetched_not_taken_for_a_directory(tmp_path, monkeypatch, capsys, command):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast, as offline
    argv = [command, "hi"] if command == "generate" else [command, "--prompts", _prompt_file(tmp_path)]
    line = _cli(capsys, argv + ["--target", "someorg/no-such-model"])
    assert (
        "someorg/no-such-model: could not be fetched from the Hugging Face Hub" in line
        and "no such directory" not in line
    )


def test_bench_out_is_written_with_normal_permissions(tmp_path):
    import os

    from dllm_spec.bench.runner import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644 and not list(tmp_path.glob(".*tmp*"))


def test_export_on_a_full_disk_leaves_nothing_behind_and_the_rerun_works(tmp_path, monkeypatch, capsys):
    import errno

    from dllm_spec.cli import main
    from dllm_spec.drafters import BlockDiffusionDrafter

    source, out = _drafter_dir(tmp_path), tmp_path / "export"
    real = BlockDiffusionDrafter.save_pretrained

    def full_disk(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BlockDiffusionDrafter, "save_pretrained", full_disk)
    line = _cli(capsys, ["export", str(source), "--format", "dllm", "--out", str(out)])
    assert (
        "No space left on device" in line and not out.exists() and [p.name for p in tmp_path.iterdir()] == ["drafter"]
    )
    monkeypatch.setattr(BlockDiffusionDrafter, "save_pretrained", real)
    main(["export", str(source), "--format", "dllm", "--out", str(out)])
    assert BlockDiffusionDrafter.from_pretrained(out).config.block_size == 6
