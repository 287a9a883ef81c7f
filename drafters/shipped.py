"""Where the trained drafters shipped with the package live."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_BLOCK_DIFFUSION = "block-diffusion-smollm2-135m"
DFLASH_BLOCK_DIFFUSION = (
    "block-diffusion-smollm2-135m-dflash"  # the DFlash-layout drafter (exports to vLLM / SGLang / transformers)
)


def shipped_drafter_dir(name: str = DEFAULT_BLOCK_DIFFUSION) -> Path:
    """Directory of a shipped drafter checkpoint; FileNotFoundError naming how to train one when missing."""
    path = ASSETS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no shipped drafter '{name}' at {path}: train one with `dllm-spec train --data data/distill --out runs/drafter` "
            "and pass its best/ directory"
        )
    return path
