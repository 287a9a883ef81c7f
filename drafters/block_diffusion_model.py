"""The block-diffusion drafter's network (DFlash-style; arXiv 2602.06036): its config, layers and
weights, and the check that a config fits a target. The runtime drafter that drafts with it is
:mod:`dllm_spec.drafters.block_diffusion`.

A few decoder layers, bidirectional inside the block, conditioned on the target's hidden states:
the states of several target layers spread over depth are concatenated, fused by Linear + RMSNorm,
then projected by each drafter layer's own k/v projections and prepended to that layer's keys and
values ("KV injection"). Queries come only from the block ``[last committed token, MASK x (B-1)]``.
The drafter owns no token embedding or LM head: it uses the target's frozen ones (optionally only
the rows of a reduced draft vocabulary, mapped back to target ids).

Two architectures (``config.architecture``):

* ``"dllm"`` (this library's own): one RMSNorm per conditioning layer before the fusion (the
  target's residual stream has a few massive dimensions), the context normalised by each drafter
  layer's input norm before its k/v, the fused state of the last context position added to every
  block input, and a learned mask embedding.
* ``"dflash"``: the layout every DFlash consumer loads (z-lab's reference, vLLM, SGLang,
  transformers' ``MuseGlimmerAssistantModel``): Qwen3-style layers with per-head q/k RMSNorm, the
  fusion ``fc`` + ``hidden_norm`` with the context k/v projected straight from it, no last-state
  injection, and the mask as a target token id (``mask_token_id``, embedded by the target). The
  massive activations are tamed by a static per-channel ``feature_scale`` on the fusion's input,
  folded into ``fc`` on export (:mod:`dllm_spec.drafters.dflash_format`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dllm_spec.drafters.base import target_vocab_size

ARCHITECTURES = ("dllm", "dflash")


class BlockDiffusionConfig(PretrainedConfig):
    """Architecture of the drafter and the target it was built for (checked on ``bind``)."""

    model_type = "dllm_block_diffusion"

    def __init__(
        self,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int = 64,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 100000.0,
        block_size: int = 16,
        target_layer_ids: tuple[int, ...] | list[int] = (2, 8, 14, 20, 27),
        target_hidden_size: int = 576,
        target_vocab_size: int | None = 49152,
        target_num_layers: int | None = 30,
        draft_vocab_size: int = 0,
        loss_decay_gamma: float = 7.0,
        num_inference_steps: int = 1,
        inject_last_context: bool | None = None,
        architecture: str = "dllm",
        mask_token_id: int | None = None,
        max_position_embeddings: int = 8192,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if inject_last_context is None:
            inject_last_context = architecture == "dllm"
        if architecture == "dflash":
            if inject_last_context:
                raise ValueError(
                    "architecture 'dflash' has no last-context injection: inject_last_context must be False"
                )
            if mask_token_id is None:
                raise ValueError("architecture 'dflash' embeds the mask as a target token: pass mask_token_id")
        if mask_token_id is not None and not 0 <= mask_token_id < (target_vocab_size or mask_token_id + 1):
            raise ValueError(
                f"mask_token_id must be a target token id in [0, {target_vocab_size}), got {mask_token_id}"
            )
        self.architecture = architecture
        self.mask_token_id = mask_token_id
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.block_size = block_size
        self.target_layer_ids = list(target_layer_ids)
        self.target_hidden_size = target_hidden_size
        self.target_vocab_size = target_vocab_size
        self.target_num_layers = target_num_layers
        self.draft_vocab_size = draft_vocab_size
        self.loss_decay_gamma = loss_decay_gamma
        self.num_inference_steps = num_inference_steps
        self.inject_last_context = inject_last_context
        if block_size < 2:
            raise ValueError(
                f"block_size must be >= 2 (the last committed token plus at least one mask), got {block_size}"
            )
        if num_attention_heads % num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        top = target_num_layers if target_num_layers is not None else max(self.target_layer_ids or [0])
        if not self.target_layer_ids or min(self.target_layer_ids) < 0 or max(self.target_layer_ids) > top:
            raise ValueError(f"target_layer_ids must index hidden_states 0..{top}, got {self.target_layer_ids}")

    @classmethod
    def for_target(
        cls, target: PreTrainedModel, num_layers: int = 2, num_target_layers: int = 5, **kwargs
    ) -> "BlockDiffusionConfig":
        """A drafter shaped like the target's own layers, conditioned on ``num_target_layers`` target
        layers spread evenly over 1..L-3 (DFlash)."""
        tc = target.config
        total = tc.num_hidden_layers
        hi = max(1, total - 3)
        ids = sorted({round(1 + i * (hi - 1) / max(1, num_target_layers - 1)) for i in range(num_target_layers)})
        rope = getattr(tc, "rope_theta", None) or (getattr(tc, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0
        )
        return cls(
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=tc.num_attention_heads,
            num_key_value_heads=tc.num_key_value_heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
            rms_norm_eps=tc.rms_norm_eps,
            rope_theta=float(rope),
            target_layer_ids=ids,
            target_hidden_size=tc.hidden_size,
            target_vocab_size=target_vocab_size(target),
            target_num_layers=total,
            max_position_embeddings=getattr(tc, "max_position_embeddings", 8192),
            **kwargs,
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (..., T) -> (..., T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., T, head_dim/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd); cos/sin (B or 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1).to(x.dtype) + rotated * sin.unsqueeze(1).to(x.dtype)


class DrafterLayer(nn.Module):
    """Pre-norm decoder layer whose attention sees injected context keys/values plus the block."""

    def __init__(self, cfg: BlockDiffusionConfig) -> None:
        super().__init__()
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, nh * hd, bias=False)
        self.k_proj = nn.Linear(h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        # per-head RMSNorm of queries and keys (Qwen3 / DFlash); the dllm architecture has none
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.architecture == "dflash" else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.architecture == "dflash" else None

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of (already normalised) states x (B, T, H) -> (B, nkv, T, hd) each."""
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=self.nkv)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=self.nkv)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(k, cos, sin), v

    def forward(self, x, ctx_k, ctx_v, cos, sin, mask) -> torch.Tensor:
        """x (B, L, H) block states; ctx_k/ctx_v (B, nkv, T, hd); mask (B|1, 1, L, T+L) bool or None."""
        h = self.input_norm(x)
        q = rearrange(self.q_proj(h), "b l (h d) -> b h l d", h=self.nh)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rotary(q, cos, sin)
        k, v = self.kv(h, cos, sin)
        keys = torch.cat([ctx_k, k], dim=2)  # (B, nkv, T+L, hd)
        values = torch.cat([ctx_v, v], dim=2)
        rep = self.nh // self.nkv
        keys = keys.repeat_interleave(rep, dim=1)  # (B, nh, T+L, hd)
        values = values.repeat_interleave(rep, dim=1)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, L, hd)
        x = x + self.o_proj(rearrange(attn, "b h l d -> b l (h d)"))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class BlockDiffusionModel(PreTrainedModel):
    """The drafter's own weights (the target's embedding and LM head are passed in, never stored)."""

    config_class = BlockDiffusionConfig
    base_model_prefix = "drafter"
    _no_split_modules = ["DrafterLayer"]

    def __init__(self, config: BlockDiffusionConfig) -> None:
        super().__init__(config)
        n_feat = len(config.target_layer_ids) * config.target_hidden_size
        dflash = config.architecture == "dflash"
        # one RMSNorm per conditioning layer: the target's residual stream has a few massive
        # dimensions (|h| up to ~25K in SmolLM2) that would otherwise swamp the fusion. The dflash
        # layout has no such norm; a static per-channel scale (folded into fc on export) does its job.
        self.feature_norms = (
            None
            if dflash
            else nn.ModuleList(RMSNorm(config.target_hidden_size, config.rms_norm_eps) for _ in config.target_layer_ids)
        )
        if dflash:
            self.register_buffer("feature_scale", torch.ones(n_feat), persistent=True)
        else:
            self.feature_scale = None
        self.fuse = nn.Linear(n_feat, config.hidden_size, bias=False)
        self.fuse_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # EAGLE-style direct input: the fused target state of the last context position (the one
        # that predicted the block's first token) is projected and added to every block input, so
        # the drafter need not first learn to find it among hundreds of context keys
        self.last_context_proj = (
            nn.Linear(config.hidden_size, config.hidden_size, bias=False) if config.inject_last_context else None
        )
        self.layers = nn.ModuleList(DrafterLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # a learned mask embedding (dllm); the dflash layout embeds config.mask_token_id with the target's table
        self.mask_embedding = None if dflash else nn.Parameter(torch.zeros(config.hidden_size))
        # target ids of the draft vocabulary (empty: the full target vocabulary)
        self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long), persistent=True)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, BlockDiffusionModel) and module.mask_embedding is not None:
            nn.init.normal_(module.mask_embedding, std=0.02)

    def mask_vector(self, embed: nn.Module) -> torch.Tensor:
        """The input state of a masked block position (H,): the learned mask embedding, or the
        target's embedding of ``mask_token_id`` (``embed``: the target's input embedding)."""
        if self.mask_embedding is not None:
            return self.mask_embedding
        return embed.weight[self.config.mask_token_id]

    def fuse_context(self, features: torch.Tensor) -> torch.Tensor:
        """Target features (B, T, n_layers * H_target) -> fused context states (B, T, H)."""
        features = features.to(self.fuse.weight.dtype)
        if self.feature_norms is None:
            return self.fuse_norm(self.fuse(features * self.feature_scale.to(features.dtype)))
        parts = features.split(self.config.target_hidden_size, dim=-1)  # n x (B, T, H_target)
        normed = torch.cat([norm(part) for norm, part in zip(self.feature_norms, parts)], dim=-1)
        return self.fuse_norm(self.fuse(normed))

    def context_kv(self, fused: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) of fused context states at ``positions`` (B|1, T)."""
        cos, sin = rotary(positions, self.config.head_dim, self.config.rope_theta)
        if self.config.architecture == "dflash":  # straight from the fusion (the keys get the per-head k norm)
            return [layer.kv(fused, cos, sin) for layer in self.layers]
        # each layer normalises the context with its own input norm, like its block states, so
        # context and block keys share a scale (else the ~400 context keys swamp the block's own)
        return [layer.kv(layer.input_norm(fused), cos, sin) for layer in self.layers]

    def block_inputs(self, x: torch.Tensor, last_fused: torch.Tensor | None) -> torch.Tensor:
        """Block input states x (..., L, H) plus the projected last context state (..., H) when the
        architecture injects it (zeros when there is no context yet)."""
        if self.last_context_proj is None or last_fused is None:
            return x
        return x + self.last_context_proj(last_fused).unsqueeze(-2).to(x.dtype)

    def block_hidden(self, x: torch.Tensor, ctx_kv, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the layers on block states x (B, L, H) at ``positions`` (B|1, L); returns normed states."""
        cos, sin = rotary(positions, self.config.head_dim, self.config.rope_theta)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, k, v, cos, sin, mask)
        return self.norm(x)

    def init_from_target(self, target: PreTrainedModel) -> None:
        """Copy the target's last decoder layers and final norm into the drafter, and into each
        feature norm the norm the target itself applies to that hidden state (a cheap, useful start)."""
        src_layers = list(target.model.layers)[-len(self.layers) :]
        names = {
            "input_norm": "input_layernorm",
            "post_norm": "post_attention_layernorm",
            "q_proj": "self_attn.q_proj",
            "k_proj": "self_attn.k_proj",
            "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj",
            "gate_proj": "mlp.gate_proj",
            "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj",
        }
        with torch.no_grad():
            for mine, theirs in zip(self.layers, src_layers):
                for a, b in names.items():
                    src = theirs.get_submodule(b).weight
                    dst = mine.get_submodule(a).weight
                    if src.shape != dst.shape:
                        raise ValueError(
                            f"cannot initialise {a} from the target: shapes {tuple(src.shape)} vs {tuple(dst.shape)}"
                        )
                    dst.copy_(src)
            self.norm.weight.copy_(target.model.norm.weight)
            layers = list(target.model.layers)
            for i, layer_id in enumerate(self.config.target_layer_ids):
                # hidden_states[i] is the input of decoder layer i (the last one feeds the final norm)
                src = layers[layer_id].input_layernorm.weight if layer_id < len(layers) else target.model.norm.weight
                if self.feature_norms is not None:
                    self.feature_norms[i].weight.copy_(src)
                else:  # the static scale starts as that gain; calibrate_feature_scale divides by the typical RMS
                    h = self.config.target_hidden_size
                    self.feature_scale[i * h : (i + 1) * h] = src.float()

    @torch.no_grad()
    def calibrate_feature_scale(self, features: torch.Tensor) -> None:
        """Divide each conditioning layer's part of ``feature_scale`` by the median per-token RMS of
        that layer's states in ``features`` (N, n_layers * H_target): the static counterpart of an
        RMSNorm per layer (the dflash architecture; a no-op for dllm)."""
        if self.feature_scale is None:
            return
        h = self.config.target_hidden_size
        for i, part in enumerate(features.float().split(h, dim=-1)):  # n x (N, H_target)
            rms = part.pow(2).mean(-1).sqrt().median().clamp_min(1e-6)
            self.feature_scale[i * h : (i + 1) * h] /= rms


def target_mismatches(cfg: BlockDiffusionConfig, target: PreTrainedModel) -> list[str]:
    """Why a drafter with config ``cfg`` cannot serve ``target`` (empty when it can). Fields an
    imported checkpoint did not record (None) are not checked."""
    tc = target.config
    problems = []
    if cfg.target_hidden_size != tc.hidden_size:
        problems.append(f"hidden size {cfg.target_hidden_size} vs the target's {tc.hidden_size}")
    if cfg.target_num_layers is not None and cfg.target_num_layers != tc.num_hidden_layers:
        problems.append(
            f"{cfg.target_num_layers} target layers vs the target's {tc.num_hidden_layers} (layer ids {cfg.target_layer_ids})"
        )
    if max(cfg.target_layer_ids) > tc.num_hidden_layers:
        problems.append(f"target layer ids {cfg.target_layer_ids} past the target's {tc.num_hidden_layers} layers")
    if cfg.target_vocab_size is not None and cfg.target_vocab_size != target_vocab_size(target):
        problems.append(f"vocabulary {cfg.target_vocab_size} vs the target's {target_vocab_size(target)}")
    if cfg.hidden_size != target.get_input_embeddings().weight.shape[1]:
        problems.append(f"drafter hidden size {cfg.hidden_size} differs from the target's embedding width")
    if cfg.mask_token_id is not None and cfg.mask_token_id >= target_vocab_size(target):
        problems.append(
            f"mask_token_id {cfg.mask_token_id} outside the target's vocabulary of {target_vocab_size(target)}"
        )
    return problems
