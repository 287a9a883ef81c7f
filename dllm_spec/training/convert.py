"""A warm start across architectures: a trained ``"dllm"`` block-diffusion drafter rewritten as a
``"dflash"`` one (the layout DFlash consumers load), as close to the same function as the two
layouts allow, for fine-tuning.

What carries over exactly: the fusion, every projection and norm of the layers, the final norm and
the draft vocabulary. What is approximated, from a sample of target features:

* each conditioning layer's RMSNorm becomes the static ``feature_scale`` (its gain over the
  layer's median per-token RMS);
* the new per-head q/k norms start at the median RMS of the heads' queries and keys, so they
  rescale little at first;
* the learned mask embedding becomes the target token whose embedding is the closest in direction
  (``mask_token_id``).

What is dropped: the last-context injection, and the per-layer input norm on the context (the
keys are re-normalised by the k norm; the values are not). Fine-tuning recovers what they carried.
"""

from __future__ import annotations

import inspect

import torch
from einops import rearrange

from dllm_spec.drafters.block_diffusion_model import BlockDiffusionConfig, BlockDiffusionModel


def nearest_token(vector: torch.Tensor, embed: torch.Tensor) -> int:
    """The row of ``embed`` (V, H) closest in cosine to ``vector`` (H,)."""
    sims = torch.nn.functional.cosine_similarity(embed.float(), vector.float()[None, :], dim=-1)  # (V,)
    return int(sims.argmax())


@torch.no_grad()
def to_dflash_architecture(
    model: BlockDiffusionModel, embed: torch.Tensor, features: torch.Tensor, mask_token_id: int | None = None
) -> BlockDiffusionModel:
    """``model`` (architecture ``"dllm"``) as a ``"dflash"`` drafter; ``embed`` (V, H) is the target's
    input embedding, ``features`` (N, n_layers * H_target) a sample of target features."""
    if model.config.architecture != "dllm":
        raise ValueError(f"expected a 'dllm' drafter to convert, got architecture {model.config.architecture!r}")
    src = model.float()
    if mask_token_id is None:
        mask_token_id = nearest_token(src.mask_embedding, embed)
    fields = set(inspect.signature(BlockDiffusionConfig.__init__).parameters) - {"self", "kwargs"}
    kwargs = {k: v for k, v in src.config.to_dict().items() if k in fields}
    kwargs.update(architecture="dflash", inject_last_context=False, mask_token_id=mask_token_id)
    cfg = BlockDiffusionConfig(**kwargs)
    out = BlockDiffusionModel(cfg)
    state = {
        k: v
        for k, v in src.state_dict().items()
        if not k.startswith(("feature_norms", "last_context_proj", "mask_embedding"))
    }
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected weights converting to dflash: {unexpected}")
    h = cfg.target_hidden_size
    features = features.float()
    for i, norm in enumerate(src.feature_norms):  # each norm's gain, then over its layer's typical RMS
        out.feature_scale[i * h : (i + 1) * h] = norm.weight.float()
    out.calibrate_feature_scale(features)
    fused = out.fuse_context(features[None])[0]  # (N, H)
    for layer, old in zip(out.layers, src.layers):
        x = old.input_norm(fused)
        q = rearrange(old.q_proj(x), "n (h d) -> n h d", h=old.nh)
        k = rearrange(old.k_proj(x), "n (h d) -> n h d", h=old.nkv)
        layer.q_norm.weight.fill_(float(q.pow(2).mean(-1).sqrt().median()))
        layer.k_norm.weight.fill_(float(k.pow(2).mean(-1).sqrt().median()))
    left = set(missing) - {"feature_scale"} - {n for n in missing if n.endswith(("q_norm.weight", "k_norm.weight"))}
    if left:
        raise RuntimeError(f"weights not carried over converting to dflash: {sorted(left)}")
    return out
