"""Drop self-distillation records whose prompt documents a held-out subject (resumable, atomic per
shard), and keep the committed list of held-out subjects up to date.

The "docs" prompts are built from the local Python standard library and man pages, so a machine
with another Python (a GPU box with Python 3.12, say) builds other prompt texts, and other
held-out hashes, for the same function. Records generated there may then explain a function whose
prompt is held out here. This script removes every record whose prompt documents a subject of
``dllm_spec.data.prompts.heldout_subjects()``: this machine's held-out subjects plus the committed
list ``dllm_spec/data/heldout_subjects.txt``. Generation itself skips those prompts
(``training_prompts``) on any machine that has the list; run ``--update-subjects`` on the
reference machine (the one the benchmarks run on) when its prompt set changes, and commit the list.

    python scripts/filter_distill_data.py --data data/distill [--dry-run] [--target HF_ID_OR_DIR]
    python scripts/filter_distill_data.py --update-subjects
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dllm_spec.data.distill import iter_shards, write_shard
from dllm_spec.data.prompts import HELDOUT_SUBJECTS_FILE, build_prompts, heldout_subjects, prompt_subject
from dllm_spec.jsonl import write_atomic
from dllm_spec.target import load_target


def _tokenizer(target: str | None):
    """The tokenizer of ``target`` (an HF id or directory), or the embedded default's."""
    if target is None:
        return load_target(None, dtype="float32", device="cpu")[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/distill")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument(
        "--target",
        default=None,
        help="the target that generated the data (its tokenizer decodes records from outside the prompt set); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--update-subjects",
        action="store_true",
        help=f"add this machine's held-out subjects to {HELDOUT_SUBJECTS_FILE.name} and stop",
    )
    args = parser.parse_args(argv)
    if args.update_subjects:
        subjects = heldout_subjects()
        write_atomic(HELDOUT_SUBJECTS_FILE, "".join(f"{s}\n" for s in sorted(subjects)).encode())
        print(f"{HELDOUT_SUBJECTS_FILE}: {len(subjects)} held-out subjects")
        return
    tokenizer = None  # loaded for the first record from outside the prompt set (ShareGPT turns, ...)
    prompts = build_prompts()
    known = {p.id: p for p in prompts}
    held = heldout_subjects(prompts)
    dropped = 0
    for shard, records in iter_shards(args.data):
        keep = []
        for r in records:
            prompt = known.get(r["prompt_id"])
            if prompt is None and tokenizer is None:
                tokenizer = _tokenizer(args.target)
            subject = (
                prompt_subject(prompt) if prompt is not None else prompt_subject(tokenizer.decode(r["prompt_ids"]))
            )
            if subject in held:
                print(f"{shard}: dropping {r['prompt_id']} (variant {r['variant']}): held-out subject {subject}")
                dropped += 1
                continue
            keep.append(r)
        if len(keep) < len(records) and not args.dry_run:
            write_shard(Path(args.data) / f"{shard}.jsonl.gz", keep)
    print(f"{'would drop' if args.dry_run else 'dropped'} {dropped} records")


if __name__ == "__main__":
    main()
