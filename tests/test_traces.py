"""Reasoning-trace script: input errors name the line, a crash mid-run loses nothing and duplicates
nothing on resume, sharding covers every prompt exactly once."""

from __future__ import annotations

import json

import pytest

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import FixedLength
from dllm_spec.traces import completed_ids, generate_traces, merge, read_prompts
from drafters import PromptLookupDrafter


class DigitTokenizer:
    """Text <-> ids for a tiny model: each character maps to one id."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] + [2 + ord(c) % 40 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids)


@pytest.fixture()
def spec(target):
    return DiffusionSpeculator(target, DigitTokenizer(), PromptLookupDrafter(), policy=FixedLength(4))


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
    assert [(p.id, p.prompt) for p in read_prompts(path)] == [("1", "first"), ("3", "third")]


def test_resume_after_a_crash_loses_nothing_and_duplicates_nothing(tmp_path, spec, monkeypatch):
    src = tmp_path / "in.jsonl"
    _write(src, [f"prompt number {i}" for i in range(6)])
    prompts = read_prompts(src)
    out = tmp_path / "traces.jsonl"
    calls = {"n": 0}
    real_generate = spec.generate

    def crashing_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed while the 4th prompt was in flight
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(spec, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(spec, prompts, out, max_new_tokens=8)
    part = next(tmp_path.glob("traces.jsonl.part-*"))
    with open(part, "ab") as fh:  # and a torn half-record, as if killed mid-write
        fh.write(b'{"id": "p9", "text": "tor')
    assert completed_ids(out) == {"p0", "p1", "p2"}
    monkeypatch.setattr(spec, "generate", real_generate)
    assert generate_traces(spec, prompts, out, max_new_tokens=8) == 3
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
