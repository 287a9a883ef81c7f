"""Reasoning-trace script: input errors name the line, a crash mid-run loses nothing and duplicates
nothing on resume, sharding covers every prompt exactly once."""

from __future__ import annotations

import glob
import json

import pytest

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters import PromptLookupDrafter
from dllm_spec.policy import FixedLength
from dllm_spec.traces import completed_ids, generate_traces, merge, read_prompts
from tests.conftest import CharTokenizer


@pytest.fixture()
def spec(target):
    return DiffusionSpeculator(target, CharTokenizer(), PromptLookupDrafter(), policy=FixedLength(4))


def _write(path, prompts):
    path.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(prompts)) + "\n")


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', ":2: malformed JSON"),
        ('{"id": "a"}\n', ":1: missing or empty 'prompt'"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', ":2: duplicate id 'a'"),
    ],
)
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
    assert (
        len(completed_ids(out)) == 3
    )  # the three saved before the kill (which three depends on the batch's finishing order)
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
    written = [
        generate_traces(spec, prompts, out, max_new_tokens=3, process_index=i, num_processes=3) for i in range(3)
    ]
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


def test_a_run_on_fewer_prompts_keeps_every_finished_trace(tmp_path, spec):
    """10 prompts finished, then a file of 3 of them (and one new): the final merge once rewrote the
    output with 3 records; every record already there stays, in place, and the new one follows."""
    src, out = tmp_path / "in.jsonl", tmp_path / "t.jsonl"
    _write(src, [f"prompt {i}" for i in range(10)])
    generate_traces(spec, read_prompts(src), out, max_new_tokens=2, batch_size=4)
    merge(read_prompts(src), out)
    before = out.read_text()
    first3 = tmp_path / "first3.jsonl"
    first3.write_text("".join(src.read_text().splitlines(keepends=True)[:3]))
    assert generate_traces(spec, read_prompts(first3), out, max_new_tokens=2) == 0
    assert merge(read_prompts(first3), out) == 10 and out.read_text() == before
    (tmp_path / "new.jsonl").write_text('{"id": "p1", "prompt": "prompt 1"}\n{"id": "extra", "prompt": "a new one"}\n')
    generate_traces(spec, read_prompts(tmp_path / "new.jsonl"), out, max_new_tokens=2)
    merge(read_prompts(tmp_path / "new.jsonl"), out)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"p{i}" for i in range(10)] + ["extra"]


@pytest.mark.parametrize("name", ["a?.jsonl", "run[1].jsonl", "x*.jsonl"])
def test_glob_characters_in_out_are_plain_characters(tmp_path, spec, name):
    """``a?.jsonl`` once merged and deleted another job's ``ab.jsonl.part-0-of-1``; ``run[1].jsonl``
    never found its own parts."""
    src, out = tmp_path / "in.jsonl", tmp_path / name
    _write(src, ["a", "b"])
    other = tmp_path / (name.replace("?", "b").replace("[1]", "1").replace("*", "y") + ".part-0-of-1")
    other.write_text('{"id": "p9", "text": "another job"}\n')
    generate_traces(spec, read_prompts(src), out, max_new_tokens=2)
    assert merge(read_prompts(src), out) == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p0", "p1"]
    assert other.read_text() == '{"id": "p9", "text": "another job"}\n'
    assert not list(tmp_path.glob(glob.escape(name) + ".part-*"))


def test_an_over_long_prompt_is_named_by_id_and_line_before_any_generation(tmp_path, spec):
    src, out = tmp_path / "in.jsonl", tmp_path / "t.jsonl"
    _write(src, ["short", "x" * 300, "short too"])  # the tiny target's context is 256 tokens
    with pytest.raises(ValueError, match=r"in\.jsonl:2: prompt id 'p1': prompt too long"):
        generate_traces(spec, read_prompts(src), out, max_new_tokens=2, source=src)
    assert not completed_ids(out)  # refused up front: nothing generated


def test_samples_per_prompt_resume_per_sample_and_their_seeds_regenerate_them(tmp_path, spec, monkeypatch):
    """--num-samples N: N records per prompt (sample 0..N-1, distinct seeds); a run killed midway
    resumes per (id, sample); each record's seed re-generates its text exactly (reproducible sampling)."""
    src = tmp_path / "in.jsonl"
    _write(src, ["abcabc", "hello there", "xyz"])
    prompts = read_prompts(src)
    out = tmp_path / "t.jsonl"
    import dllm_spec.traces as traces_module

    real_append, calls = traces_module.append_record, {"n": 0}

    def crashing_append(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_append(*args, **kwargs)

    kw = dict(max_new_tokens=12, temperature=0.9, seed=4, batch_size=4, num_samples=3)
    monkeypatch.setattr(traces_module, "append_record", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(spec, prompts, out, **kw)
    monkeypatch.setattr(traces_module, "append_record", real_append)
    assert len(completed_ids(out)) == 4
    assert generate_traces(spec, prompts, out, **kw) == 5
    assert merge(prompts, out, 3) == 9
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in records] == [(p.id, j) for p in prompts for j in range(3)]
    assert len({r["seed"] for r in records}) == 9
    for r in records:
        again = spec.generate(r["prompt"], max_new_tokens=12, temperature=0.9, seed=r["seed"])
        assert again.text == r["text"]
    with pytest.raises(ValueError, match="num-samples > 1 needs --temperature"):
        generate_traces(spec, prompts, tmp_path / "g.jsonl", max_new_tokens=4, num_samples=2)
