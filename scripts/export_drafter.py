"""Copy a trained block-diffusion drafter checkpoint for shipping, with its weights cast (default
bfloat16: half the size; the drafter is cast to the target's dtype when bound, and drafts never
change the output, only how many are accepted).

    python scripts/export_drafter.py runs/drafter/best drafters/assets/block-diffusion-smollm2-135m
"""

import argparse

import torch

from drafters.block_diffusion import BlockDiffusionDrafter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    drafter = BlockDiffusionDrafter.from_pretrained(args.src)
    drafter.model.to(getattr(torch, args.dtype))
    drafter.save_pretrained(args.dst)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
