"""The released drafter-training pipeline (data -> features -> masked-diffusion training -> evaluation)."""
