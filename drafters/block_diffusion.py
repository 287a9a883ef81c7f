"""The block-diffusion drafter at run time: :class:`BlockDiffusionDrafter` drafts a block (or a
draft tree) per row with the network of :mod:`dllm_spec.drafters.block_diffusion_model`, keeping a
position-indexed cache of each row's projected target context.

Denoising runs in S steps with an :class:`dllm_spec.drafters.schedulers.UnmaskingScheduler`; see that
module for which q is returned and why it keeps speculative sampling exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.drafters.base import Drafter, DraftProposal, Sequences, target_vocab_size
from dllm_spec.drafters.block_diffusion_model import (  # noqa: F401  (re-exported: the drafter's network lives there)
    BlockDiffusionConfig,
    BlockDiffusionModel,
    DrafterLayer,
    RMSNorm,
    apply_rotary,
    rotary,
    target_mismatches,
)
from dllm_spec.drafters.denoise import denoise_block
from dllm_spec.drafters.dflash_format import checkpoint_layout, load_dflash, save_dflash
from dllm_spec.drafters.schedulers import (
    ConfidenceUnmaskingScheduler,
    LeftToRightUnmaskingScheduler,
    UnmaskingScheduler,
)
from dllm_spec.verify.kv_cache import StaticKVCache
from dllm_spec.verify.sampling import SamplingParams

#: committed cycles whose features may wait for the drafter's next draft (their memory is b x n x F each)
MAX_PENDING = 64


def _check_config_json(path: Path) -> None:
    """``path/config.json`` must be a JSON object of a block-diffusion drafter (this library's or a
    DFlash layout): another model's directory is not one."""
    import json

    config = path / "config.json"
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config}: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config} must hold a JSON object, got a {type(meta).__name__}")
    if checkpoint_layout(path) is None and meta.get("model_type") != BlockDiffusionConfig.model_type:
        raise ValueError(
            f"{path} is not a block-diffusion drafter ({config} has model_type {meta.get('model_type')!r}, "
            f"expected {BlockDiffusionConfig.model_type!r} or a DFlash layout)"
        )


def _check_finite(model: nn.Module, path: Path) -> None:
    """Every floating-point weight of ``model`` (loaded from ``path``) is finite."""
    bad = [
        name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(f"{path}: the drafter's weights {', '.join(bad[:6])} hold NaN or infinite values")


class BlockDiffusionDrafter(Drafter):
    """Drafter protocol around :class:`BlockDiffusionModel`.

    Args:
        model: the drafter weights.
        scheduler: unmasking strategy; default confidence order with ``config.num_inference_steps`` steps.
        num_inference_steps: S (overrides the config's default).
        tree_width: 1 drafts a chain; m > 1 drafts a tree of each position's m most likely tokens
            (as many nodes as the policy asks for, verified in one target forward: see
            :mod:`dllm_spec.verify.tree`).
        min_block: the shortest block run when fewer drafts than the trained block are asked for.
    """

    def __init__(
        self,
        model: BlockDiffusionModel,
        scheduler: UnmaskingScheduler | None = None,
        num_inference_steps: int | None = None,
        tree_width: int = 1,
        min_block: int = 8,
    ) -> None:
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        if min_block < 2:
            raise ValueError(f"min_block must be >= 2 (the last token and one mask), got {min_block}")
        self.min_block = min_block
        self.tree_width = tree_width
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.config: BlockDiffusionConfig = model.config
        steps = num_inference_steps or self.config.num_inference_steps
        self.scheduler = scheduler or ConfidenceUnmaskingScheduler(num_inference_steps=steps)
        self.target_layer_ids = tuple(self.config.target_layer_ids)
        self.name = f"block-diffusion-s{steps}" + (f"-tree{tree_width}" if tree_width > 1 else "")
        self._embed: nn.Module | None = None
        self._head: nn.Module | None = None  # H -> V_draft: the rows of the target's LM head the drafter predicts
        self._full_head: torch.Tensor | None = None  # (V, H) the target's LM head
        self._ctx: StaticKVCache | None = None  # per-row context keys/values of every drafter layer
        self._last_fused: torch.Tensor | None = None  # (max_batch, H) fused state of each row's last context position
        self._pending: list[tuple[torch.Tensor, list[int]]] = []  # committed features not yet in _ctx

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        num_inference_steps: int | None = None,
        tree_width: int = 1,
        min_block: int = 8,
        **kwargs,
    ) -> "BlockDiffusionDrafter":
        """Load a drafter saved by :meth:`save_pretrained`, or a DFlash-format checkpoint (z-lab /
        vLLM / SGLang's ``DFlashDraftModel`` or transformers' ``MuseGlimmerAssistantModel`` layout,
        :mod:`dllm_spec.drafters.dflash_format`). What is not a complete, finite block-diffusion
        drafter (another model's directory, a ``config.json`` that is not an object, missing or
        non-finite weights) is a ValueError naming the file and the weights."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"no block-diffusion drafter checkpoint at {p} (config.json missing)")
        _check_config_json(p)
        if checkpoint_layout(p) is not None:  # z-lab / vLLM / SGLang or transformers' DFlash layout
            try:
                model = load_dflash(p)
            except KeyError as exc:
                raise ValueError(f"{p}: the DFlash checkpoint's weights have no {exc.args[0]!r}") from None
            _check_finite(model, p)
            if kwargs.get("dtype") is not None:
                model.to(kwargs["dtype"])
            return cls(model, None, num_inference_steps, tree_width, min_block)
        try:
            model, info = BlockDiffusionModel.from_pretrained(p, output_loading_info=True, **kwargs)
        except Exception as exc:  # corrupt config.json, truncated weights (SafetensorError), ...: name the files
            raise ValueError(
                f"cannot load the block-diffusion drafter in {p} (config.json / model.safetensors): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{p / 'model.safetensors'} lacks {len(missing)} of the drafter's weights: "
                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"
            )
        _check_finite(model, p)
        scheduler = None
        if (p / UnmaskingScheduler.config_name).is_file():
            cfg = UnmaskingScheduler.load_config(p)
            cls_name = cfg.get("_class_name", "ConfidenceUnmaskingScheduler")
            sched_cls = {"LeftToRightUnmaskingScheduler": LeftToRightUnmaskingScheduler}.get(
                cls_name, ConfidenceUnmaskingScheduler
            )
            scheduler = sched_cls.from_config(cfg)
            if num_inference_steps:
                scheduler.register_to_config(num_inference_steps=num_inference_steps)
        return cls(
            model,
            scheduler,
            num_inference_steps or (scheduler.config.num_inference_steps if scheduler else None),
            tree_width,
            min_block,
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the weights, config and unmasking schedule (what :meth:`from_pretrained` reads)."""
        self.model.save_pretrained(path)
        self.scheduler.save_pretrained(path)

    def export(
        self,
        path: str | os.PathLike,
        layout: str = "dflash",
        dtype: torch.dtype | None = None,
        target: PreTrainedModel | None = None,
    ) -> Path:
        """Write the drafter in a DFlash layout (``"dflash"``: z-lab / vLLM / SGLang; ``"transformers"``:
        ``MuseGlimmerAssistantModel``). A reduced draft vocabulary needs ``target`` (its LM head rows
        are written for vLLM) unless the drafter is bound."""
        head = target.get_output_embeddings().weight if target is not None else self._full_head
        return save_dflash(self.model, path, layout, dtype, head)

    @property
    def vocab_size(self) -> int:
        return int(self.config.target_vocab_size)

    @property
    def steps(self) -> int:
        return int(self.scheduler.config.num_inference_steps)

    def bind(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        problems = target_mismatches(self.config, target)
        if problems:
            raise ValueError("this block-diffusion drafter was trained for another target: " + "; ".join(problems))
        if self.config.target_vocab_size is None:  # an imported checkpoint that did not record them
            self.config.target_vocab_size = target_vocab_size(target)
        if self.config.target_num_layers is None:
            self.config.target_num_layers = target.config.num_hidden_layers
        self.model.to(device=target.device, dtype=target.dtype)
        self._embed = target.get_input_embeddings()
        head = target.get_output_embeddings().weight
        self._full_head = head
        vocab = self.model.draft_vocab
        if vocab.numel():  # a reduced draft vocabulary: its rows of the LM head, as a module of its own
            rows = nn.Linear(head.shape[1], vocab.numel(), bias=False, device=head.device, dtype=head.dtype)
            rows.weight = nn.Parameter(head.detach()[vocab.to(head.device)], requires_grad=False)
            self._head = nn.Sequential(rows)  # a container, so a kernel pass can swap the linear inside
        else:
            self._head = target.get_output_embeddings()  # the target's own LM head (and its kernels)

    def kernel_modules(self) -> list[nn.Module]:
        own = [self.model]
        if self._head is not None and self.model.draft_vocab.numel():
            own.append(self._head)
        return own

    # ---- sequence state -----------------------------------------------------------------------
    # Per row, a position-indexed cache of the projected context keys/values of every drafter layer
    # (verify.kv_cache.StaticKVCache): row r holds the committed tokens 0 .. len_r - 2 (all but the
    # last, like the target's cache). Only committed positions ever arrive, so rejection needs no crop.
    def _ensure_cache(self, device: torch.device) -> StaticKVCache:
        if self._ctx is None:
            cfg = self.config
            self._ctx = StaticKVCache(
                cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 1, self.model.fuse.weight.dtype, device
            )
            self._last_fused = torch.zeros((1, cfg.hidden_size), dtype=self.model.fuse.weight.dtype, device=device)
        return self._ctx

    def begin(self, rows: list[int], seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        ctx = self._ensure_cache(seqs.device)
        self._catch_up()
        ctx.start_rows(rows)
        if self._last_fused.shape[0] < ctx.max_batch:
            grown = torch.zeros(
                (ctx.max_batch, self._last_fused.shape[1]), dtype=self._last_fused.dtype, device=self._last_fused.device
            )
            grown[: self._last_fused.shape[0]] = self._last_fused
            self._last_fused = grown
        self._last_fused[rows] = 0
        if features is not None and max(counts) > 0:
            self._extend(features, counts, rows)

    def commit(self, seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        """Queue the committed positions' features; they enter the context cache when the drafter next
        drafts (or the batch changes), in one projection: while the policy skips drafting, a cycle
        costs the drafter nothing. At most ``MAX_PENDING`` cycles wait (a bound on their memory)."""
        if features is not None and max(counts, default=0) > 0:
            self._pending.append((features, list(counts)))
            if len(self._pending) >= MAX_PENDING:
                self._catch_up()

    def reorder(self, index: list[int]) -> None:
        if self._ctx is None:
            return
        keep = torch.tensor(index, dtype=torch.long)  # queued cycles follow their rows; none when no row stays
        self._pending = [(f[keep.to(f.device)], [c[i] for i in index]) for f, c in self._pending] if index else []
        self._ctx.reorder(index)
        idx = torch.tensor(index, dtype=torch.long, device=self._last_fused.device)
        self._last_fused[: len(index)] = self._last_fused[idx]

    def _catch_up(self) -> None:
        """Project the queued features of every active row into the context cache, in one call."""
        if not self._pending:
            return
        chunks, self._pending = self._pending, []
        if len(chunks) == 1:
            self._extend(*chunks[0], None)
            return
        features = torch.cat([f for f, _ in chunks], dim=1)  # (b, sum n_j, F): each chunk's valid positions first
        valid = torch.cat(
            [
                torch.arange(f.shape[1], device=f.device)[None, :] < torch.tensor(c, device=f.device)[:, None]
                for f, c in chunks
            ],
            dim=1,
        )  # (b, sum n_j)
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid positions first, in order
        packed = features.gather(1, order[:, :, None].expand_as(features))
        counts = valid.sum(1).tolist()
        self._extend(packed[:, : max(counts)], counts, None)

    @torch.inference_mode()
    def _extend(self, features: torch.Tensor, counts: list[int], rows: list[int] | None) -> None:
        """Append the projected keys/values of newly cached target positions (b, n, F), ``counts``
        valid per row, to the context cache of ``rows`` (default: every active row)."""
        ctx = self._ctx
        n = features.shape[1]
        ctx.plan(n, rows)
        positions = ctx.positions(torch.arange(n, device=features.device))  # (b, n) absolute positions
        fused = self.model.fuse_context(features)  # (b, n, H)
        for layer_idx, (k, v) in enumerate(self.model.context_kv(fused, positions)):
            ctx.update(k, v, layer_idx)
        device = features.device
        last = torch.tensor([max(c - 1, 0) for c in counts], device=device)
        picked = fused[torch.arange(len(counts), device=device), last]  # (b, H) each row's last valid position
        keep = torch.tensor([c > 0 for c in counts], device=device)[:, None]
        slots = torch.arange(len(counts), device=device) if rows is None else torch.tensor(rows, device=device)
        self._last_fused[slots] = torch.where(keep, picked.to(self._last_fused.dtype), self._last_fused[slots])
        ctx.advance(counts, rows)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Block states (B, L, H) -> logits over the draft vocabulary (B, L, V_draft) (the full target
        vocabulary when the drafter has no reduced one)."""
        b, L, h = hidden.shape
        flat = hidden.reshape(
            b * L, h
        )  # (B, L, H) -> (B*L, H): one 2-D matmul (a strided 3-D input dispatches to a slow bmm)
        return self._head(flat).view(b, L, -1).float()

    @torch.inference_mode()
    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        batch = seqs.batch
        if max_tokens <= 0 or self._embed is None:
            return DraftProposal.empty(batch, seqs.device)
        if self._ctx is None or self._ctx.batch != batch:
            raise RuntimeError("propose() before begin(): the drafter has no target context for these rows")
        self._catch_up()
        # the trained block, or (when few drafts are asked for, as in a large batch) a shorter one of at
        # least ``min_block``: cost falls with the block while acceptance barely does (4-5% lower tau
        # at block 8 than at the trained 16 for the shipped drafter)
        length = min(self.config.block_size, max(self.min_block, max_tokens + 1)) - 1
        device = seqs.device
        ctx_len = self._ctx.length_tensor()  # (B,) = each row's position of its last committed token
        positions = ctx_len[:, None] + torch.arange(length + 1, device=device)  # (B, L+1)
        first = self._embed(seqs.last()[:, None])  # (B, 1, H)
        mask_vec = self.model.mask_vector(self._embed).to(first.dtype)
        vocab = self.model.draft_vocab if self.model.draft_vocab.numel() else None
        ctx_kv = [self._ctx.view(i) for i in range(self.config.num_hidden_layers)]
        lens = self._ctx.lengths[:batch]
        mask = None
        if min(lens) != max(lens):  # ragged contexts: each row sees its own context and the whole block
            col = torch.arange(max(lens) + length + 1, device=device)
            allowed = (col[None, :] < ctx_len[:, None]) | (col[None, :] >= max(lens))  # (B, T+L+1)
            mask = allowed[:, None, None, :]  # (B, 1, 1, T+L+1)
        last_fused = self._last_fused[:batch]

        def logits_fn(tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
            ids = tokens if vocab is None else vocab[tokens]  # draft ids -> target ids
            body = torch.where(masked.unsqueeze(-1), mask_vec.expand(batch, length, -1), self._embed(ids))
            x = self.model.block_inputs(torch.cat([first, body], 1), last_fused)
            hidden = self.model.block_hidden(x, ctx_kv, positions, mask)
            return self._logits(hidden[:, 1:])  # (B, L, V_draft): block position j predicts token start + j

        return denoise_block(
            self.scheduler,
            self.steps,
            length,
            logits_fn,
            sampling,
            generators,
            batch,
            device,
            max_tokens,
            vocab=vocab,
            target_vocab_size=self.config.target_vocab_size,
            tree_width=self.tree_width,
            keys=seqs.keys,
        )
