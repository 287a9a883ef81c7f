"""Reasoning-trace script: input errors name the line, a crash mid-run loses nothing and duplicates
nothing on resume, sharding covers every prompt exactly once."""

from __future__ import annotations

import json

import pytest

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import FixedLength
from dllm_spec.traces import completed_ids, generate_traces, merge, read_prompts
from drafters import PromptLookupDrafter
from tests.conftest import CharTokenizer


@pytest.fixture()
def spec(target):
    return DiffusionSpeculator(target, CharTokenizer(), PromptLookupDrafter(), policy=FixedLength(4))


def _write(path, prompts):
    path.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(prompts)) + "\n")


@pytest.mark.parametrize("content,message", [
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', ":2: malformed JSON"),
    ('{"id": "a"}\n', ":1: missing or empty 'prompt'"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', ":2: duplicate id 'a'"),
])
def test_malformed_input_names_the_line(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_plain_text_input_uses_line_numbers_as_ids(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("first\n\nthird\n")
    assert [(p.id, p.text) for p in read_prompts(path)] == [("1", "first"), ("3", "third")]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_resume_after_a_crash_loses_nothing_and_duplicates_nothing(tmp_path, spec, monkeypatch, batch_size):
    src = tmp_path / "in.jsonl"
    _write(src, [f"prompt number {i}" for i in range(6)])
    prompts = read_prompts(src)
    out = tmp_path / "traces.jsonl"
    import dllm_spec.traces as traces_module

    calls = {"n": 0}
    real_append = traces_module.append_record

    def crashing_append(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed while the 4th finished prompt was being saved
        return real_append(*args, **kwargs)

    monkeypatch.setattr(traces_module, "append_record", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(spec, prompts, out, max_new_tokens=8, batch_size=batch_size)
    part = next(tmp_path.glob("traces.jsonl.part-*"))
    with open(part, "ab") as fh:  # and a torn half-record, as if killed mid-write
        fh.write(b'{"id": "p9", "text": "tor')
    assert len(completed_ids(out)) == 3  # the three saved before the kill (which three depends on the batch's finishing order)
    monkeypatch.setattr(traces_module, "append_record", real_append)
    assert generate_traces(spec, prompts, out, max_new_tokens=8, batch_size=batch_size) == 3
    merge(prompts, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in prompts]
    assert all(r["token_count"] == 8 and r["stop_reason"] == "length" and "tau" in r["stats"] for r in records)


def test_sharding_covers_every_prompt_exactly_once(tmp_path, spec):
    src = tmp_path / "in.jsonl"
    _write(src, [f"p {i}" for i in range(7)])
    prompts = read_prompts(src)
    out = tmp_path / "t.jsonl"
    written = [generate_traces(spec, prompts, out, max_new_tokens=3, process_index=i, num_processes=3) for i in range(3)]
    assert written == [3, 2, 2]
    merge(prompts, out)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [p.id for p in prompts]
    assert not list(tmp_path.glob("t.jsonl.part-*"))


def test_merge_refuses_when_prompts_are_missing(tmp_path, spec):
    src = tmp_path / "in.jsonl"
    _write(src, ["a", "b"])
    prompts = read_prompts(src)
    out = tmp_path / "t.jsonl"
    generate_traces(spec, prompts, out, max_new_tokens=2, process_index=0, num_processes=2)
    with pytest.raises(RuntimeError, match="no trace yet"):
        merge(prompts, out)


def test_batched_traces_equal_one_at_a_time_traces(tmp_path, spec):
    src = tmp_path / "in.jsonl"
    _write(src, [f"prompt {'x' * i} number {i}" for i in range(7)])
    prompts = read_prompts(src)
    texts = {}
    for batch_size in (1, 3):
        out = tmp_path / f"t{batch_size}.jsonl"
        assert generate_traces(spec, prompts, out, max_new_tokens=12, batch_size=batch_size) == 7
        merge(prompts, out)
        texts[batch_size] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts[1] == texts[3]


def test_output_path_checks_happen_before_any_work(tmp_path):
    from dllm_spec.traces import check_output_path

    src = tmp_path / "in.txt"
    src.write_text("a prompt without a final newline")
    with pytest.raises(ValueError, match="is the input file"):
        check_output_path(src, [src])
    assert src.read_text() == "a prompt without a final newline"  # untouched
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path, [src])


def test_two_writers_of_one_output_are_refused(tmp_path, spec):
    from dllm_spec.traces import locked

    src = tmp_path / "in.jsonl"
    _write(src, ["a", "b"])
    out = tmp_path / "t.jsonl"
    with locked(out.with_name(out.name + ".part-0-of-1")):
        with pytest.raises(ValueError, match="another process"):
            generate_traces(spec, read_prompts(src), out, max_new_tokens=2)


def test_a_resumed_record_from_an_edited_prompt_is_reported(tmp_path, spec, capsys):
    src = tmp_path / "in.jsonl"
    _write(src, ["first", "second"])
    out = tmp_path / "t.jsonl"
    generate_traces(spec, read_prompts(src), out, max_new_tokens=2)
    _write(src, ["first, edited", "second"])
    assert generate_traces(spec, read_prompts(src), out, max_new_tokens=2) == 0
    assert "different prompt" in capsys.readouterr().err
