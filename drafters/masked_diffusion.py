"""Standalone masked-diffusion drafter (SpecDiff / DiffuSpec style): a masked-diffusion language
model that shares the target's tokenizer drafts by appending a block of mask tokens to the
context (or a trailing window of it) and denoising it in S steps with the same unmasking
schedulers as the block-diffusion drafter."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.drafters.base import Drafter, DraftProposal, Sequences, check_vocab_compatible, target_vocab_size
from dllm_spec.drafters.denoise import denoise_block
from dllm_spec.drafters.schedulers import ConfidenceUnmaskingScheduler, UnmaskingScheduler
from dllm_spec.verify.keyed import NoiseKeys
from dllm_spec.verify.sampling import SamplingParams


class MaskedDiffusionDrafter(Drafter):
    """Drafts with any model mapping ids (with mask tokens) to logits over the target's vocabulary.

    Args:
        model: a bidirectional masked LM (``model(input_ids=...).logits`` of shape (B, T, V)).
        mask_token_id: the id the model was trained to read as "masked" (from its tokenizer or
            config, never guessed); it is never proposed.
        block_size: tokens drafted per cycle.
        num_inference_steps: denoising steps S.
        window: how many trailing context tokens the model sees.
        scheduler: unmasking strategy (default: confidence order).
        tree_width: 1 drafts a chain; m > 1 a draft tree of each position's m most likely tokens.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        mask_token_id: int,
        block_size: int = 8,
        num_inference_steps: int = 2,
        window: int = 256,
        scheduler: UnmaskingScheduler | None = None,
        name: str | None = None,
        tree_width: int = 1,
    ) -> None:
        if block_size < 1 or window < 1 or tree_width < 1:
            raise ValueError(
                f"block_size, window and tree_width must be >= 1, got {block_size}, {window}, {tree_width}"
            )
        self.tree_width = tree_width
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.mask_token_id = int(mask_token_id)
        self.block_size = block_size
        self.window = window
        self.scheduler = scheduler or ConfidenceUnmaskingScheduler(num_inference_steps=num_inference_steps)
        self.steps = num_inference_steps
        self.name = name or f"mdlm-s{num_inference_steps}" + (f"-tree{tree_width}" if tree_width > 1 else "")
        self._appended_mask = False

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs
    ) -> "MaskedDiffusionDrafter":
        """Load a masked LM and take the mask id from its tokenizer (or config)."""
        model = AutoModelForMaskedLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        mask_id = (
            tokenizer.mask_token_id
            if tokenizer.mask_token_id is not None
            else getattr(model.config, "mask_token_id", None)
        )
        if mask_id is None:
            raise ValueError(f"{name_or_path}: neither its tokenizer nor its config defines a mask token id")
        # drafters trained by dllm_spec.training.token_drafters record their window and block
        for key, attr in (("window", "draft_window"), ("block_size", "draft_block_size")):
            if key not in kwargs and getattr(model.config, attr, None):
                kwargs[key] = int(getattr(model.config, attr))
        return cls(model, mask_id, **kwargs)

    @property
    def vocab_size(self) -> int:
        """The vocabulary shared with the target: the model's, less a mask row appended past it."""
        v = target_vocab_size(self.model)
        return v - 1 if self.mask_token_id == v - 1 and self._appended_mask else v

    def kernel_modules(self) -> list[nn.Module]:
        return [self.model]

    def bind(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        # a mask token added after the shared vocabulary (one extra row) is allowed: its logit is dropped
        self._appended_mask = self.mask_token_id == target_vocab_size(target) == target_vocab_size(self.model) - 1
        check_vocab_compatible(self.vocab_size, target, self.name)
        self.model.to(target.device)

    @torch.inference_mode()
    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        if max_tokens <= 0:
            return DraftProposal.empty(seqs.batch, seqs.device)
        gens = generators if isinstance(generators, list) else [generators] * seqs.batch
        # one row at a time: the window of each row's context differs in length near the start
        return DraftProposal.stack(
            [
                self._propose_row(
                    seqs.tail(r, self.window)[None],
                    max_tokens,
                    sampling,
                    gens[r],
                    None if seqs.keys is None else seqs.keys.row(r),
                )
                for r in range(seqs.batch)
            ]
        )

    def _propose_row(
        self, context: torch.Tensor, max_tokens: int, sampling: SamplingParams, generator, keys: NoiseKeys | None = None
    ) -> DraftProposal:
        length = (
            self.block_size if self.tree_width > 1 else min(self.block_size, max_tokens)
        )  # a tree's max_tokens counts nodes

        def logits_fn(tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
            block = torch.where(masked, torch.full_like(tokens, self.mask_token_id), tokens)
            logits = self.model(input_ids=torch.cat([context, block], dim=1)).logits[:, -length:].float()  # (1, L, V)
            logits = logits[..., : self.vocab_size].clone()
            if self.mask_token_id < self.vocab_size:
                logits[..., self.mask_token_id] = float("-inf")
            return logits

        return denoise_block(
            self.scheduler,
            self.steps,
            length,
            logits_fn,
            sampling,
            generator,
            1,
            context.device,
            max_tokens,
            tree_width=self.tree_width,
            keys=keys,
        )
