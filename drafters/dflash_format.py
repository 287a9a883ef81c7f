"""DFlash checkpoint layouts: export a block-diffusion drafter to them, and import them.

Two layouts, both a ``config.json`` + ``model.safetensors`` directory without token embedding or
LM head (the target's are used):

* ``"dflash"``: what z-lab's reference code, vLLM and SGLang load.
  ``architectures: ["DFlashDraftModel"]``, a Qwen3 config (``model_type: "qwen3"``) with
  ``dflash_config {target_layer_ids, mask_token_id, block_size}``, ``block_size`` and
  ``num_target_layers``; weights ``fc``, ``hidden_norm``, ``layers.N.self_attn.{q,k,v,o}_proj``,
  ``layers.N.self_attn.{q,k}_norm``, ``layers.N.mlp.{gate,up,down}_proj``,
  ``layers.N.{input,post_attention}_layernorm``, ``norm``. A reduced draft vocabulary is written
  as vLLM reads it: ``draft_vocab_size``, ``d2t`` (target id = draft id + d2t[draft id]) and the
  drafter's own ``lm_head`` (z-lab's code and SGLang need the full vocabulary).
* ``"transformers"``: transformers 5.x's ``MuseGlimmerAssistantModel`` (``model_type:
  "muse_glimmer_assistant"``), used as ``target.generate(ids, assistant_model=drafter,
  speculation_type="dflash")``: the same layers, the fusion as ``encoder.fc`` +
  ``encoder.output_norm_enc``. The full vocabulary only (it applies the target's LM head).

Layer indices. This library's ``target_layer_ids`` index ``hidden_states`` as transformers
returns them (0 = the embeddings, i = the output of decoder layer i - 1). Every DFlash consumer
reads ``hidden_states[id + 1]``: its id is ours minus one, so ours must be >= 1.

Only the ``"dflash"`` architecture of :class:`~dllm_spec.drafters.block_diffusion_model.BlockDiffusionModel`
can be represented; its static ``feature_scale`` is folded into ``fc``. Exporting anything else
is an error that lists what blocks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dllm_spec.drafters.block_diffusion_model import BlockDiffusionConfig, BlockDiffusionModel

LAYOUTS = ("dflash", "transformers")

# our name -> the DFlash name, per decoder layer (shared by both layouts)
_LAYER_NAMES = {
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_FUSION_NAMES = {"dflash": ("fc", "hidden_norm"), "transformers": ("encoder.fc", "encoder.output_norm_enc")}


def export_blockers(config: BlockDiffusionConfig, layout: str) -> list[str]:
    """Why a drafter with ``config`` cannot be written in ``layout`` (empty when it can)."""
    if layout not in LAYOUTS:
        raise ValueError(f"format must be one of {LAYOUTS}, got {layout!r}")
    problems = []
    if config.architecture != "dflash":
        problems.append(
            f"architecture {config.architecture!r} (per-layer feature norms, the context normalised by each "
            "layer's input norm, last-context injection, no q/k norm, a learned mask embedding); "
            "train it with dllm-spec train --architecture dflash"
        )
    if config.target_layer_ids and min(config.target_layer_ids) < 1:
        problems.append(
            f"target_layer_ids {config.target_layer_ids} include 0 (the embeddings), which DFlash's "
            "hidden_states[id + 1] cannot address"
        )
    if layout == "transformers" and config.draft_vocab_size:
        problems.append(
            f"a reduced draft vocabulary ({config.draft_vocab_size} tokens): transformers applies the target's "
            "full LM head; export --format dflash (vLLM's d2t) or train with the full vocabulary"
        )
    return problems


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta)}


def dflash_config(config: BlockDiffusionConfig, layout: str, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``layout`` for a drafter with ``config``."""
    layer_ids = [i - 1 for i in config.target_layer_ids]
    common = dict(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act="silu",
        attention_dropout=0.0,
        rope_parameters=_rope(config.rope_theta),
        max_position_embeddings=config.max_position_embeddings,
        layer_types=["full_attention"] * config.num_hidden_layers,
        block_size=config.block_size,
        num_target_layers=config.target_num_layers,
        target_hidden_size=config.target_hidden_size,
        dtype=str(dtype).removeprefix("torch."),
    )
    if layout == "transformers":
        return dict(
            architectures=["MuseGlimmerAssistantModel"],
            model_type="muse_glimmer_assistant",
            **common,
            sliding_window=config.max_position_embeddings,  # unused: every layer is full attention
            mask_token_id=config.mask_token_id,
            target_layer_ids=layer_ids,
            target_vocab_size=config.target_vocab_size,
        )
    out = dict(
        architectures=["DFlashDraftModel"],
        model_type="qwen3",
        **common,
        rope_theta=float(config.rope_theta),
        attention_bias=False,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        vocab_size=config.target_vocab_size,
        dflash_config={
            "target_layer_ids": layer_ids,
            "mask_token_id": config.mask_token_id,
            "block_size": config.block_size,
        },
    )
    if config.draft_vocab_size:
        out["draft_vocab_size"] = config.draft_vocab_size
    return out


def dflash_state_dict(
    model: BlockDiffusionModel, layout: str, lm_head: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``layout``'s names (``feature_scale`` folded into fc).
    ``lm_head`` (V, H): the target's output embedding, needed for a reduced draft vocabulary."""
    fc_name, norm_name = _FUSION_NAMES[layout]
    fc = model.fuse.weight.detach().float() * model.feature_scale.float()[None, :]  # (H, n*H_t) * (n*H_t,)
    out = {
        f"{fc_name}.weight": fc,
        f"{norm_name}.weight": model.fuse_norm.weight.detach(),
        "norm.weight": model.norm.weight.detach(),
    }
    for i, layer in enumerate(model.layers):
        for ours, theirs in _LAYER_NAMES.items():
            out[f"layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight.detach()
    if model.config.draft_vocab_size:
        if lm_head is None:
            raise ValueError("a reduced draft vocabulary exports its own lm_head: pass the target's output embedding")
        vocab = model.draft_vocab.to(torch.long)
        out["lm_head.weight"] = lm_head.detach()[vocab.to(lm_head.device)].cpu()
        out["d2t"] = (vocab - torch.arange(len(vocab))).cpu()  # target id = draft id + d2t[draft id]
    return out


def save_dflash(
    model: BlockDiffusionModel,
    out: str | os.PathLike,
    layout: str,
    dtype: torch.dtype | None = None,
    lm_head: torch.Tensor | None = None,
) -> Path:
    """Write ``model`` to the directory ``out`` in ``layout``; returns ``out``.

    Raises ValueError listing what blocks the export before writing anything."""
    problems = export_blockers(model.config, layout)
    if problems:
        raise ValueError(f"this drafter cannot be exported as {layout!r}: " + "; ".join(problems))
    dtype = dtype or model.fuse.weight.dtype
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v if not v.is_floating_point() else v.to(dtype)).contiguous()
        for k, v in dflash_state_dict(model, layout, lm_head).items()
    }
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)  # readable like config.json (safetensors writes it 0600)
    (out / "config.json").write_text(json.dumps(dflash_config(model.config, layout, dtype), indent=2) + "\n")
    return out


def checkpoint_layout(path: str | os.PathLike) -> str | None:
    """``"dflash"`` or ``"transformers"`` when ``path`` holds a DFlash-format checkpoint, else None."""
    config = Path(path) / "config.json"
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("model_type") == "muse_glimmer_assistant":
        return "transformers"
    if "DFlashDraftModel" in (meta.get("architectures") or []) or "dflash_config" in meta:
        return "dflash"
    return None


def load_dflash(path: str | os.PathLike) -> BlockDiffusionModel:
    """A :class:`BlockDiffusionModel` (architecture ``"dflash"``) from a checkpoint in either layout.

    The target's vocabulary and depth come from the config when it records them (``vocab_size`` /
    ``target_vocab_size``, ``num_target_layers``); else they are checked against the target on bind."""
    p = Path(path)
    layout = checkpoint_layout(p)
    if layout is None:
        raise ValueError(
            f"{p / 'config.json'} is not a DFlash checkpoint (no DFlashDraftModel / muse_glimmer_assistant config)"
        )
    meta = json.loads((p / "config.json").read_text())
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {p}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except Exception as exc:  # a truncated or foreign file: name it
            raise ValueError(f"cannot read {f}: {type(exc).__name__}: {exc}") from None
    extra = meta.get("dflash_config") or {}
    layer_ids = extra.get("target_layer_ids", meta.get("target_layer_ids"))
    mask_token_id = extra.get("mask_token_id", meta.get("mask_token_id"))
    block_size = extra.get("block_size", meta.get("block_size"))
    missing = [
        name
        for name, v in (("target_layer_ids", layer_ids), ("mask_token_id", mask_token_id), ("block_size", block_size))
        if v is None
    ]
    if missing:
        raise ValueError(f"{p / 'config.json'}: no {', '.join(missing)}")
    if any(lt != "full_attention" for lt in meta.get("layer_types") or []) or meta.get("use_sliding_window"):
        raise ValueError(
            f"{p / 'config.json'}: sliding-window layers are not supported (layer_types {meta.get('layer_types')})"
        )
    fc_name, norm_name = _FUSION_NAMES[layout]
    fc = weights[f"{fc_name}.weight"]
    target_hidden = meta.get("target_hidden_size") or fc.shape[1] // len(layer_ids)
    rope = (meta.get("rope_parameters") or {}).get("rope_theta", meta.get("rope_theta", 10000.0))
    d2t = weights.get("d2t")
    cfg = BlockDiffusionConfig(
        architecture="dflash",
        hidden_size=meta["hidden_size"],
        intermediate_size=meta["intermediate_size"],
        num_hidden_layers=meta["num_hidden_layers"],
        num_attention_heads=meta["num_attention_heads"],
        num_key_value_heads=meta.get("num_key_value_heads", meta["num_attention_heads"]),
        head_dim=meta.get("head_dim") or meta["hidden_size"] // meta["num_attention_heads"],
        rms_norm_eps=meta.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope),
        block_size=int(block_size),
        target_layer_ids=[i + 1 for i in layer_ids],
        target_hidden_size=int(target_hidden),
        target_vocab_size=meta.get("vocab_size", meta.get("target_vocab_size")),
        target_num_layers=meta.get("num_target_layers"),
        draft_vocab_size=0 if d2t is None else len(d2t),
        mask_token_id=int(mask_token_id),
        max_position_embeddings=meta.get("max_position_embeddings", 32768),
    )
    model = BlockDiffusionModel(cfg)
    state = {
        "fuse.weight": fc,
        "fuse_norm.weight": weights[f"{norm_name}.weight"],
        "norm.weight": weights["norm.weight"],
        "feature_scale": torch.ones(fc.shape[1]),
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in _LAYER_NAMES.items():
            state[f"layers.{i}.{ours}.weight"] = weights[f"layers.{i}.{theirs}.weight"]
    state["draft_vocab"] = (
        torch.zeros(0, dtype=torch.long) if d2t is None else torch.arange(len(d2t)) + d2t.to(torch.long)
    )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval()
