"""Drafter specs (drafters/__init__.py, build_drafter)."""

from __future__ import annotations

import pytest

from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from tests.conftest import (
    make_drafter,
)


def test_build_drafter_loads_a_checkpoint_directory_with_steps(target, tmp_path):
    from dllm_spec.drafters import build_drafter

    make_drafter(target, 1).save_pretrained(tmp_path / "ckpt")
    drafter = build_drafter(f"{tmp_path / 'ckpt'}:3", target)
    assert isinstance(drafter, BlockDiffusionDrafter) and drafter.steps == 3
    assert build_drafter(str(tmp_path / "ckpt"), target).steps == 1
    tree = build_drafter(f"{tmp_path / 'ckpt'}:2:tree=3", target)
    assert tree.steps == 2 and tree.tree_width == 3 and tree.name == "block-diffusion-s2-tree3"
    pair = build_drafter(f"prompt-lookup+{tmp_path / 'ckpt'}:tree=3", target)
    assert pair.tree_width == 3 and type(pair).__name__ == "GraftDrafter"
    assert type(build_drafter(f"prompt-lookup+{tmp_path / 'ckpt'}", target)).__name__ == "FallbackDrafter"
    with pytest.raises(ValueError, match="tree=M"):
        build_drafter(f"{tmp_path / 'ckpt'}:tree=0", target)
    with pytest.raises(ValueError, match="unknown drafter"):
        build_drafter("no-such-drafter", target)
