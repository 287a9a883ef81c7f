"""Off-policy text shards (dllm_spec/data/offpolicy.py): one record per assistant reply, in the
distillation layout, marked off-policy, capped, resumed, and never mixed with generated records."""

from __future__ import annotations

import pytest

from dllm_spec.data.distill import encode_conversation_prompt, read_shards, write_shard
from dllm_spec.data.offpolicy import SOURCE, TextDataConfig, assistant_turns, write_text_data
from dllm_spec.data.sharegpt import Conversation
from tests.conftest import VOCAB, CharTokenizer

EOS = VOCAB - 1
CHATS = [
    Conversation(
        f"c{i}",
        (("system", "be brief"),)
        + tuple(
            x for t in range(3) for x in (("user", f"question {t} of {i}?"), ("assistant", f"answer {t} " * (i + 1)))
        ),
        "question",
    )
    for i in range(5)
] + [Conversation("open", (("user", "no reply yet"),), "other")]


def test_every_reply_becomes_one_off_policy_record_with_its_real_context(tmp_path):
    assert len(assistant_turns(CHATS)) == 15  # the unanswered last turn gives none
    tok = CharTokenizer(eos_token_id=EOS)
    config = TextDataConfig(context_cap=400, shard_size=4)
    stats = write_text_data(tok, CHATS, tmp_path, config, progress=False)
    records = list(read_shards(tmp_path))
    assert stats["records"] == 15 and stats["shards"] == 4 and len(records) == 15
    for r in records:
        conversation = next(c for c in CHATS if c.id == r["conversation_id"])
        prompt = conversation.prompt(r["turn"])
        reply = conversation.turns[conversation.user_turns()[r["turn"]] + 1][1]
        assert r["prompt_id"] == prompt.id and r["source"] == SOURCE and r["temperature"] is None
        assert r["prompt_ids"] == encode_conversation_prompt(tok, prompt, 400)[0]
        assert r["response_ids"] == tok(reply, add_special_tokens=False)["input_ids"] + [EOS]
        assert r["stop_reason"] == "eos" and r["history_turns"] == 2 * r["turn"]


def test_replies_are_capped_and_the_token_budget_resumes_without_repeats(tmp_path):
    tok = CharTokenizer(eos_token_id=EOS)
    capped = TextDataConfig(max_response_tokens=12, shard_size=2, max_tokens=30)
    first = write_text_data(tok, CHATS, tmp_path, capped, progress=False)
    assert 30 <= first["total_tokens"] < 30 + 12  # stops at the first reply past the budget
    records = list(read_shards(tmp_path))
    assert all(len(r["response_ids"]) <= 12 for r in records)
    long = [r for r in records if r["stop_reason"] == "length"]
    assert long and all(EOS not in r["response_ids"] for r in long)
    rest = write_text_data(tok, CHATS, tmp_path, TextDataConfig(max_response_tokens=12, shard_size=2), progress=False)
    ids = [r["prompt_id"] for r in read_shards(tmp_path)]
    assert rest["records"] == 15 - len(records) and sorted(ids) == sorted(set(ids)) and len(ids) == 15
    assert write_text_data(tok, CHATS, tmp_path, TextDataConfig(), progress=False)["records"] == 0


def test_a_directory_of_generated_records_is_refused(tmp_path):
    write_shard(
        tmp_path / "shard-00000.jsonl.gz",
        [
            {
                "prompt_id": "p",
                "source": "sharegpt",
                "variant": 0,
                "temperature": 0.0,
                "prompt_ids": [0],
                "response_ids": [2],
            }
        ],
    )
    with pytest.raises(ValueError, match="source 'sharegpt'"):
        write_text_data(CharTokenizer(eos_token_id=EOS), CHATS, tmp_path, progress=False)


@pytest.mark.parametrize(
    "field,value", [("context_cap", 0), ("max_response_tokens", -1), ("shard_size", 0), ("max_tokens", -5)]
)
def test_a_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TextDataConfig(**{field: value})
