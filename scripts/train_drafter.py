"""Train a drafter for a target (resumable; the block-diffusion one runs under `accelerate launch`).

    python scripts/generate_distill_data.py --out data/distill        # self-distillation data
    python scripts/train_drafter.py --data data/distill --out runs/drafter --max-steps 1000
    python scripts/train_drafter.py --drafter ar --data data/distill --out runs/ar    # comparison drafters
    python scripts/train_drafter.py --drafter mdlm --data data/distill --out runs/mdlm
    accelerate launch --num_processes 2 scripts/train_drafter.py --data data/distill --out runs/drafter
"""

from dllm_spec.training.cli import main

if __name__ == "__main__":
    main()
