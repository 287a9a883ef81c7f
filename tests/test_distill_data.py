"""Self-distillation data: resumable generation (each (prompt, variant) exactly once, greedy records
are the target's own greedy output, new temperatures append as new variants) and the prompt set
(growing it keeps the original order and the benchmark's held-out prompts)."""

from __future__ import annotations

import pytest
import torch

from dllm_spec.data.distill import (
    ConversationDistillConfig,
    DistillConfig,
    encode_conversation_prompt,
    generate_conversation_data,
    generate_distillation_data,
    iter_shards,
    read_shards,
)
from dllm_spec.data.prompts import (
    HELDOUT_SUBJECTS_FILE,
    Prompt,
    build_prompts,
    heldout_prompts,
    heldout_subjects,
    prompt_subject,
    training_prompts,
)
from tests.conftest import VOCAB, CharTokenizer, tiny_llama

PROMPTS = [Prompt(f"p{i}", "chat", "hello " * (1 + i % 3) + str(i)) for i in range(6)]


def _keys(directory) -> list[tuple[str, int]]:
    return [(r["prompt_id"], r["variant"]) for r in read_shards(directory)]


def test_a_stopped_run_resumes_without_repeating_or_losing_a_response(target, tmp_path):
    config = DistillConfig(temperatures=(0.0, 0.8), max_new_tokens=5, batch_size=4, shard_size=4)
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path, config, max_shards=1)
    assert len(_keys(tmp_path)) == 4
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path, config)
    keys = _keys(tmp_path)
    assert sorted(keys) == sorted((p.id, v) for p in PROMPTS for v in (0, 1))
    assert len(keys) == len(set(keys))


def test_greedy_variants_come_first_and_equal_the_targets_greedy_output(target, tmp_path):
    config = DistillConfig(temperatures=(0.0, 0.8), max_new_tokens=6, batch_size=3, shard_size=6)
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path, config)
    shards = list(iter_shards(tmp_path))
    assert {r["variant"] for r in shards[0][1]} == {0}  # variant by variant: every greedy response first
    for record in shards[0][1]:
        ids = torch.tensor([record["prompt_ids"]])
        expected = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)[0, ids.shape[1] :]
        assert record["response_ids"] == expected.tolist()


def test_a_response_ends_at_any_stop_id_of_the_generation_config(tmp_path):
    """Qwen2.5 and Llama 3 instruct models stop on several ids (``generation_config.eos_token_id`` a
    list): a row that stops on one the tokenizer does not name, while the batch goes on, is cut
    there, not kept with the padding HF generate writes after it."""
    target = tiny_llama(0)  # not the shared fixture: its generation config changes here
    tok = CharTokenizer(eos_token_id=VOCAB - 1)
    config = DistillConfig(temperatures=(0.0,), max_new_tokens=8, batch_size=2, shard_size=2)

    def free(prompt: Prompt) -> list[int]:
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompt.text}])])
        return target.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=1)[0, ids.shape[1] :].tolist()

    first, other = free(PROMPTS[0]), free(PROMPTS[1])
    end = next(i for i in range(1, 6) if first[i] not in first[:i] and first[i] not in other)
    target.generation_config.eos_token_id = [VOCAB - 1, first[end]]
    generate_distillation_data(target, tok, PROMPTS[:2], tmp_path, config)
    responses = {r["prompt_id"]: r["response_ids"] for r in read_shards(tmp_path)}
    assert responses == {PROMPTS[0].id: first[: end + 1], PROMPTS[1].id: other}


def test_an_appended_temperature_adds_only_the_new_variant(target, tmp_path):
    generate_distillation_data(
        target,
        CharTokenizer(eos_token_id=VOCAB - 1),
        PROMPTS,
        tmp_path,
        DistillConfig(temperatures=(0.0,), max_new_tokens=4, batch_size=6, shard_size=6),
    )
    before = _keys(tmp_path)
    generate_distillation_data(
        target,
        CharTokenizer(eos_token_id=VOCAB - 1),
        PROMPTS,
        tmp_path,
        DistillConfig(temperatures=(0.0, 1.0), max_new_tokens=4, batch_size=6, shard_size=6),
    )
    added = _keys(tmp_path)[len(before) :]
    assert sorted(added) == sorted((p.id, 1) for p in PROMPTS)
    assert {r["temperature"] for r in read_shards(tmp_path) if r["variant"] == 1} == {1.0}


def test_a_rerun_that_changes_a_stored_variants_temperature_is_refused(target, tmp_path):
    generate_distillation_data(
        target,
        CharTokenizer(eos_token_id=VOCAB - 1),
        PROMPTS[:2],
        tmp_path,
        DistillConfig(temperatures=(0.0, 0.8), max_new_tokens=3, batch_size=4, shard_size=4),
    )
    with pytest.raises(ValueError, match="variant 1 at temperature 0.8"):
        generate_distillation_data(
            target,
            CharTokenizer(eos_token_id=VOCAB - 1),
            PROMPTS[:2],
            tmp_path,
            DistillConfig(temperatures=(0.0, 0.7), max_new_tokens=3),
        )


def test_growing_the_prompt_set_keeps_the_original_order_and_the_benchmark_prompts():
    base = build_prompts(extended=False)
    full = build_prompts()
    assert [p.id for p in full[: len(base)]] == [p.id for p in base]
    assert len(full) > len(base) and len({p.id for p in full}) == len(full)
    assert {p.category for p in full[len(base) :]} == {"docs"}
    held = heldout_prompts(per_category=4)
    assert all(p.split == "heldout" for p in held)
    assert {p.id for p in held} <= {p.id for p in base}


def test_no_training_prompt_documents_a_held_out_subject(tmp_path):
    prompts = build_prompts()
    train = training_prompts()
    held = heldout_subjects(prompts)
    assert train and all(p.split == "train" and prompt_subject(p) not in held for p in train)
    # A subject listed by another machine (the committed list) is excluded too.
    victim = next(p for p in train if prompt_subject(p))
    listed = tmp_path / "subjects.txt"
    listed.write_text(prompt_subject(victim) + "\n")
    assert prompt_subject(victim) in heldout_subjects(prompts, listed)
    assert prompt_subject(victim) not in heldout_subjects(prompts, None)


def test_the_committed_subject_list_covers_the_benchmark_prompts():
    listed = set(HELDOUT_SUBJECTS_FILE.read_text().split())
    subjects = {prompt_subject(p) for p in heldout_prompts(per_category=4) if p.category == "docs"}
    assert subjects and subjects <= listed


def test_the_prompt_set_does_not_depend_on_what_was_imported_before():
    import subprocess
    import sys

    code = "from dllm_spec.data.prompts import build_prompts; print(','.join(p.id for p in build_prompts()))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    assert fresh.split(",") == [p.id for p in build_prompts()]


# ---- conversations through the library's engine -------------------------------------------------
class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer whose chat template renders every message (role initial + content)."""

    chat_template = "every message"

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = True, tokenize: bool = True, return_dict: bool = False
    ) -> list[int]:
        return self("".join(m["role"][0] + m["content"] for m in messages) + "a")["input_ids"]


CHATS = [
    Prompt(
        f"sharegpt:c{i}:{t}",
        "question",
        f"turn {t} of chat {i}?",
        history=tuple(x for k in range(t) for x in (("user", f"turn {k} of chat {i}?"), ("assistant", f"reply {k}"))),
    )
    for i in range(4)
    for t in range(2)
]


def test_conversation_turns_are_generated_through_the_engine_and_resume(target, tmp_path):
    tok = ChatCharTokenizer(eos_token_id=VOCAB - 1)
    config = ConversationDistillConfig(
        temperatures=(0.0, 0.8), max_new_tokens=6, context_cap=200, batch_size=3, shard_size=3, window=6
    )
    stats = generate_conversation_data(target, tok, CHATS, tmp_path, config, max_shards=1, progress=False)
    first = _keys(tmp_path)
    assert stats["shards"] == 1 and len(first) == 3 and stats["new_tokens"] > 0
    generate_conversation_data(target, tok, CHATS, tmp_path, config, progress=False)
    keys = _keys(tmp_path)
    assert keys[:3] == first and len(keys) == len(set(keys))
    assert sorted(keys) == sorted((p.id, v) for p in CHATS for v in (0, 1))
    records = list(read_shards(tmp_path))
    for r in records:
        assert r["source"] == "sharegpt" and r["conversation_id"] == r["prompt_id"].split(":")[1]
        assert r["turn"] == int(r["prompt_id"].rsplit(":", 1)[1]) and r["history_turns"] == 2 * r["turn"]
        if r["variant"] == 0:  # greedy: the target's own greedy continuation of the templated history
            ids = torch.tensor([r["prompt_ids"]])
            expected = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)[
                0, ids.shape[1] :
            ].tolist()
            assert r["response_ids"] == expected[: len(r["response_ids"])] and len(r["response_ids"]) >= 1
    # The order interleaves: a prompt's variants together, greedy first.
    order = [(r["prompt_id"], r["variant"]) for r in records]
    assert all(order.index((pid, 0)) < order.index((pid, 1)) for pid, _ in order)
    again = generate_conversation_data(target, tok, CHATS, tmp_path, config, progress=False)
    assert again["records"] == 0 and again["shards"] == 0


def test_the_context_cap_drops_the_oldest_history_first_then_cuts_the_turn():
    tok = ChatCharTokenizer()
    long_history = tuple(
        x for k in range(6) for x in (("user", f"question {k} " * 3), ("assistant", f"answer {k} " * 3))
    )
    prompt = Prompt("p", "other", "the last question?", history=long_history)
    full = encode_conversation_prompt(tok, prompt, 10_000)
    assert full[1:] == (0, False)
    ids, dropped, cut = encode_conversation_prompt(tok, prompt, len(full[0]) - 20)
    assert dropped == 2 and not cut and len(ids) <= len(full[0]) - 20  # one (user, assistant) pair went
    ids, dropped, cut = encode_conversation_prompt(tok, Prompt("q", "other", "x" * 300, history=long_history), 60)
    assert dropped == len(long_history) and cut and len(ids) <= 60
