"""Train a block-diffusion drafter for a target (resumable; runs under `accelerate launch`).

    python scripts/generate_distill_data.py --out data/distill        # self-distillation data
    python scripts/train_drafter.py --data data/distill --out runs/drafter --max-steps 600
    accelerate launch --num_processes 2 scripts/train_drafter.py --data data/distill --out runs/drafter
"""

from dllm_spec.training.cli import main

if __name__ == "__main__":
    main()
