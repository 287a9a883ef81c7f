"""Bad or edge input, as a hostile but realistic user gives it: every case is a clear error that
names the argument or file, raised before any work, and nothing is lost. One table per surface:
the Python API, configs and specs, files, and the CLI (exit status 2 with one line, no traceback)."""

from __future__ import annotations

import shutil

import pytest
import torch

from dllm_spec import DiffusionSpeculator, SpeculatorConfig
from dllm_spec.policy import CostAwarePolicy, FixedLength, build_policy
from dllm_spec.prompt import Prompt
from drafters import PromptLookupDrafter, build_drafter
from tests.conftest import VOCAB, tiny_llama

IDS = torch.tensor([[0, 5, 9, 14]])


@pytest.fixture(scope="module")
def spec():
    return DiffusionSpeculator(tiny_llama(0), None, PromptLookupDrafter(), policy=FixedLength(2),
                               config=SpeculatorConfig(max_batch_size=4))


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
    from drafters import AutoregressiveDrafter

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
    (lambda: build_drafter("prompt-lookup:x", tiny_llama(0)), "invalid literal|prompt-lookup"),
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
    from drafters import BlockDiffusionDrafter

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        BlockDiffusionDrafter.from_pretrained(tmp_path / "nowhere")


def test_a_corrupt_config_json_is_named(tmp_path):
    from drafters import BlockDiffusionDrafter

    path = _drafter_dir(tmp_path)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json"):
        BlockDiffusionDrafter.from_pretrained(path)
    with pytest.raises(ValueError, match="config.json"):
        build_drafter(str(path), tiny_llama(0))


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from drafters import BlockDiffusionDrafter

    path = _drafter_dir(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path}.*model.safetensors"):
        BlockDiffusionDrafter.from_pretrained(path)


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


CLI_CASES = [
    (lambda t: ["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (lambda t: ["generate", "hi", "--temperature", "-1"], "temperature"),
    (lambda t: ["generate", "hi", "--top-p", "2"], "top_p"),
    (lambda t: ["generate", "  "], "empty prompt"),
    (lambda t: ["generate", "hi", "--threads", "-1"], "--threads"),
    (lambda t: ["generate", "hi", "--device", "cuda:7"] if not torch.cuda.is_available() else ["generate", "hi", "--threads", "0"],
     "--device|--threads"),
    (lambda t: ["generate", "hi", "--target", str(t / "no" / "such" / "dir")], "--target"),
    (lambda t: ["bench", "--repeats", "0"], "--repeats"),
    (lambda t: ["bench", "--max-new-tokens", "0"], "--max-new-tokens"),
    (lambda t: ["bench", "--out", str(t)], "is a directory"),
    (lambda t: ["bench", "--batch-sizes", "0,x"], "--batch-sizes"),
    (lambda t: ["bench", "--peers", "vllm"], "--peers"),
    (lambda t: ["bench", "--peers", "llama.cpp", "--batch-sizes", "1"], "--peers"),
    (lambda t: ["bench", "--prompts", str(t / "missing.txt")], "missing.txt"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "in.txt")], "is the input file"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t)], "is a directory"),
    (lambda t: ["traces", str(t / "missing.jsonl"), "--out", str(t / "o.jsonl")], "missing.jsonl"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "o.jsonl"), "--temperature", "-2"], "temperature"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "o.jsonl"), "--batch-size", "0"], "batch-size|positive integer"),
    (lambda t: ["traces", _prompt_file(t), "--out", str(t / "o.jsonl"), "--min-new-tokens", "-1"], "min_new_tokens"),
    (lambda t: ["study", "--lengths", "abc"], "--lengths"),
    (lambda t: ["study", "--lengths", "0"], "lengths"),
    (lambda t: ["study", "--repeats", "0"], "repeats"),
    (lambda t: ["study", "--prompts", str(t / "missing.txt")], "missing.txt"),
    (lambda t: ["train", "--data", str(t / "nowhere"), "--out", str(t / "run")], "--data"),
    (lambda t: ["train", "--data", str(t), "--out", str(t / "run"), "--architecture", "eagle"], "architecture"),
    (lambda t: ["export", "block-diffusion", "--format", "gguf", "--out", str(t / "x")], "--format"),
    (lambda t: ["export", "block-diffusion", "--format", "dflash", "--out", str(t)] if (t / "f").write_text("x") else [],
     "not an empty directory"),
    (lambda t: ["export", str(t / "nothing"), "--format", "dflash", "--out", str(t / "x")], "no drafter checkpoint"),
    (lambda t: ["export", "block-diffusion", "--format", "transformers", "--out", str(t / "x"), "--dtype", "int3"], "--dtype"),
    (lambda t: ["export", "block-diffusion", "--format", "transformers", "--out", str(t / "x")], "cannot be exported.*architecture"),
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
    from dllm_spec import bench

    real = bench.DiffusionSpeculator.generate
    # the tiny target has no tokenizer: the bench's string prompts become fixed input ids
    monkeypatch.setattr(bench.DiffusionSpeculator, "generate", lambda self, prompt, **kwargs: real(self, IDS, **kwargs))
    calls = []
    bench.run_bench(spec, ["prompt-lookup"], [Prompt(str(i), "c", "p") for i in range(3)], max_new_tokens=2, repeats=1,
                    on_result=lambda r: calls.append(len(r["records"])))
    assert calls == [2, 4, 6]  # after every prompt: plain AR and the drafter
