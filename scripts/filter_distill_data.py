"""Drop self-distillation records whose prompt documents a held-out subject of this machine's
prompt set (resumable, atomic per shard).

The "docs" prompts are built from the local Python standard library and man pages, so a machine
with another Python (a GPU box with Python 3.12, say) builds other prompt texts, and other
held-out hashes, for the same function. Records generated there may then explain a function whose
local prompt is held out. This script removes every record whose prompt id is unknown here and
whose backticked subject (`os.path.join`, `tar`) is the subject of a local held-out prompt.

    python scripts/filter_distill_data.py --data data/distill
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dllm_spec.data.distill import iter_shards, write_shard
from dllm_spec.data.prompts import build_prompts
from dllm_spec.target import load_target

SUBJECT = re.compile(r"`([^`]+)`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/distill")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    _, tokenizer = load_target(None, dtype="float32", device="cpu")
    prompts = build_prompts()
    known = {p.id for p in prompts}
    held = {m.group(1) for p in prompts if p.split == "heldout" and (m := SUBJECT.search(p.text))}
    for shard, records in iter_shards(args.data):
        keep = []
        for r in records:
            m = None if r["prompt_id"] in known else SUBJECT.search(tokenizer.decode(r["prompt_ids"]))
            if m and m.group(1) in held:
                print(f"{shard}: dropping {r['prompt_id']} (variant {r['variant']}): held-out subject {m.group(1)}")
                continue
            keep.append(r)
        if len(keep) < len(records) and not args.dry_run:
            write_shard(Path(args.data) / f"{shard}.jsonl.gz", keep)


if __name__ == "__main__":
    main()
