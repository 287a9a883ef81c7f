"""Training sequences from shards (dllm_spec/training/sequences.py): the held-out split by
conversation, several data directories with their own shard names, an evaluation-only directory,
and off-policy records."""

from __future__ import annotations

import pytest

from dllm_spec.data.distill import write_shard
from dllm_spec.training.sequences import has_gaps, load_sequences, shard_rows


def _record(conversation: int, turn: int, temperature: float | None) -> dict:
    return {
        "prompt_id": f"sharegpt:c{conversation}:{turn}", "conversation_id": f"c{conversation}", "variant": 0,
        "temperature": temperature, "prompt_ids": [0, 5, 6], "response_ids": [7 + turn, 8, 9, 10],
    }  # fmt: skip


def _dir(path, temperature, conversations=range(40), turns=2):
    path.mkdir(parents=True)
    write_shard(
        path / "shard-00000.jsonl.gz", [_record(c, t, temperature) for c in conversations for t in range(turns)]
    )
    return path


def test_one_directory_splits_by_conversation_and_keeps_plain_shard_names(tmp_path):
    train, held = load_sequences(_dir(tmp_path / "a", 0.0), 64, 4)
    assert held and train and len(train) + len(held) == 80
    assert {s.shard for s in train + held} == {"shard-00000"} and not has_gaps(train + held)
    ids = lambda seqs: {s.ids[3] - 7 for s in seqs}  # noqa: E731 (the turn)
    assert ids(held) == {0, 1}  # both turns of a held-out conversation are held out


def test_several_directories_name_their_shards_and_split_alike(tmp_path):
    on, off = _dir(tmp_path / "onpolicy", 0.0), _dir(tmp_path / "text", None)
    train, held = load_sequences([on, off], 64, 4)
    assert {s.shard for s in train} == {"onpolicy-shard-00000", "text-shard-00000"}
    assert all(s.on_policy for s in train if s.shard.startswith("onpolicy")) and not any(
        s.on_policy or s.greedy for s in train if s.shard.startswith("text")
    )
    held_on = {s.row for s in held if s.shard.startswith("onpolicy")}
    held_off = {s.row for s in held if s.shard.startswith("text")}
    assert held_on == held_off  # the same conversations on both sides
    rows = shard_rows(train + held)
    assert set(rows) == {"onpolicy-shard-00000", "text-shard-00000"} and all(len(r) == 80 for r in rows.values())


def test_an_evaluation_only_directory_is_all_held_out_and_training_held_outs_are_dropped(tmp_path):
    data, heldout = _dir(tmp_path / "train", 0.0), _dir(tmp_path / "eval", 0.0, conversations=range(100, 106), turns=1)
    train, held = load_sequences([data], 64, 4, [heldout])
    assert len(held) == 6 and {s.shard for s in held} == {"eval-shard-00000"}
    alone, alone_held = load_sequences([data], 64, 4)
    assert len(train) == len(alone) and len(alone_held) > 0  # training's own held-out are left out, not trained on
    assert has_gaps(train + held)  # so the caches need shard_rows's gaps
    assert len(shard_rows(train + held, allow_gaps=True)["train-shard-00000"]) == 80
    with pytest.raises(ValueError, match="rows"):
        shard_rows(train + held)


def test_off_policy_data_alone_needs_an_evaluation_directory(tmp_path):
    off = _dir(tmp_path / "text", None)
    with pytest.raises(ValueError, match="no greedy held-out sequence"):
        load_sequences([off], 64, 4)
    train, held = load_sequences([off], 64, 4, [_dir(tmp_path / "eval", 0.0, conversations=[200], turns=1)])
    assert not any(s.on_policy for s in train) and [s.greedy for s in held] == [True]


def test_two_directories_of_one_name_are_refused(tmp_path):
    a, b = _dir(tmp_path / "x" / "data", 0.0), _dir(tmp_path / "y" / "data", 0.0)
    with pytest.raises(ValueError, match="share a name"):
        load_sequences([a, b], 64, 4)
