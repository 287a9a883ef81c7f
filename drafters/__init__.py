"""Drafters behind one protocol (:class:`dllm_spec.drafters.base.Drafter`)."""

from __future__ import annotations

from transformers import PreTrainedModel

from dllm_spec.drafters.autoregressive import AutoregressiveDrafter
from dllm_spec.drafters.base import Drafter, DraftProposal, NullDrafter
from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel
from dllm_spec.drafters.composite import FallbackDrafter, GraftDrafter, pair_drafter
from dllm_spec.drafters.masked_diffusion import MaskedDiffusionDrafter
from dllm_spec.drafters.prompt_lookup import PromptLookupDrafter

__all__ = [
    "Drafter",
    "DraftProposal",
    "NullDrafter",
    "PromptLookupDrafter",
    "AutoregressiveDrafter",
    "BlockDiffusionDrafter",
    "BlockDiffusionModel",
    "BlockDiffusionConfig",
    "MaskedDiffusionDrafter",
    "FallbackDrafter",
    "GraftDrafter",
    "pair_drafter",
    "build_drafter",
]


def build_drafter(spec: str, target: PreTrainedModel) -> Drafter:
    """A drafter from a short spec: ``none``, ``prompt-lookup[:MAX_NGRAM]``, ``early-exit[:N]``,
    ``ar:<HF id or path>``, ``block-diffusion[:OPTIONS]`` (the shipped drafter),
    ``block-diffusion-dflash[:OPTIONS]`` (the shipped DFlash-layout drafter), or a checkpoint
    directory ``<dir>[:OPTIONS]`` (a block-diffusion drafter, a masked LM, or else a causal LM used as
    AR drafter). OPTIONS for the diffusion drafters, ``:``-separated: ``STEPS`` (or ``steps=S``) and
    ``tree=M`` (``block-diffusion:tree=4``: a draft tree of each position's 4 most likely tokens;
    ``block-diffusion:2:tree=4`` with two denoising steps).
    ``A+B`` combines a free drafter A with a model drafter B (:func:`pair_drafter`): B's chain where A
    has nothing good (:class:`FallbackDrafter`), or A's chain grafted onto B's tree
    (:class:`GraftDrafter`), e.g. ``prompt-lookup+block-diffusion:tree=4``. Specs never contain ``@``, which the CLI uses to attach a
    block-length policy."""
    import json
    import os

    if "+" in spec:
        first, _, rest = spec.partition("+")
        return pair_drafter(build_drafter(first, target), build_drafter(rest, target))

    name, _, arg = spec.partition(":")
    if name in ("none", "ar-baseline"):
        return NullDrafter()
    if name in ("prompt-lookup", "pld"):
        return PromptLookupDrafter(max_ngram=_int_arg(spec, arg, "MAX_NGRAM")) if arg else PromptLookupDrafter()
    if name == "early-exit":
        return AutoregressiveDrafter.from_target_layers(
            target, _int_arg(spec, arg, "N (the target layers it keeps)") if arg else None
        )
    if name == "ar" and arg:
        return AutoregressiveDrafter.from_pretrained(arg, dtype=target.dtype, device=target.device)
    path, options = spec, {}
    if name in ("block-diffusion", "block-diffusion-dflash"):
        from dllm_spec.drafters.shipped import DEFAULT_BLOCK_DIFFUSION, DFLASH_BLOCK_DIFFUSION, shipped_drafter_dir

        asset = DEFAULT_BLOCK_DIFFUSION if name == "block-diffusion" else DFLASH_BLOCK_DIFFUSION
        path, options = str(shipped_drafter_dir(asset)), _diffusion_options(arg, spec)
    elif not os.path.isdir(spec) and arg and os.path.isdir(name):
        path, options = name, _diffusion_options(arg, spec)
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        try:
            with open(config) as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            meta = {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"drafter {spec!r}: cannot read {config}: {exc}") from None
        if meta.get("model_type") == BlockDiffusionConfig.model_type:
            return BlockDiffusionDrafter.from_pretrained(
                path, num_inference_steps=options.get("steps"), tree_width=options.get("tree", 1)
            )
        if any(arch.endswith("ForMaskedLM") for arch in meta.get("architectures") or []):
            kwargs = {"num_inference_steps": options["steps"]} if "steps" in options else {}
            return MaskedDiffusionDrafter.from_pretrained(
                path, dtype=target.dtype, tree_width=options.get("tree", 1), **kwargs
            )
        if options:
            raise ValueError(
                f"drafter {spec!r}: steps/tree options apply to diffusion drafters, and {path} is a causal LM"
            )
        return AutoregressiveDrafter.from_pretrained(path, dtype=target.dtype, device=target.device)
    raise ValueError(
        f"unknown drafter {spec!r}: use 'none', 'prompt-lookup', 'early-exit[:N]', 'ar:<path or id>', "
        "'block-diffusion[:STEPS]', a checkpoint directory '<dir>[:STEPS]', or 'A+B' (a free drafter A, a model drafter B beside it)"
    )


def _int_arg(spec: str, arg: str, what: str) -> int:
    """``arg`` as a positive integer, or a ValueError naming ``spec`` and what it expects."""
    if not arg.strip().isdigit() or int(arg) < 1:
        name = spec.partition(":")[0]
        raise ValueError(
            f"drafter {spec!r}: expected {name}:{what.split()[0]} with {what} a positive integer, got {arg!r}"
        )
    return int(arg)


def _diffusion_options(arg: str, spec: str) -> dict[str, int]:
    """``"2"`` -> {"steps": 2}; ``"2:tree=4"`` or ``"steps=2:tree=4"`` -> {"steps": 2, "tree": 4}; ``""`` -> {}."""
    options: dict[str, int] = {}
    for item in arg.split(":") if arg else []:
        key, _, value = item.partition("=") if "=" in item else ("steps", "", item)
        if key not in ("steps", "tree") or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"drafter {spec!r}: options are STEPS, steps=S and tree=M (positive integers, ':'-separated), got {item!r}"
            )
        options[key] = int(value)
    return options
