"""Autoregressive drafting: a smaller causal LM (sharing the target's tokenizer) proposes k tokens
one at a time, KV-cached; or the target's own first layers with its final norm and LM head
(LayerSkip-style early-exit self-speculation, no training)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.drafters.base import Drafter, DraftProposal, Sequences, check_vocab_compatible, target_vocab_size
from dllm_spec.verify.keyed import keyed_candidates
from dllm_spec.verify.kv_cache import StaticKVCache
from dllm_spec.verify.sampling import SamplingParams, probs_from_logits, sample, warp_logits


class AutoregressiveDrafter(Drafter):
    """Drafts with a causal LM. Greedy when the sampling is greedy; otherwise samples each token from
    q = the drafter's distribution warped with the same temperature/top-k/top-p as the target's p,
    and returns that q so the verifier's speculative sampling is exact.

    Args:
        model: a causal LM whose ids mean the same as the target's.
        tokenizer: its tokenizer, if any (checked against the target's vocabulary on ``bind``).
        name: label in stats and benchmarks.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, name: str = "autoregressive"
    ) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self._cache: StaticKVCache | None = None  # per-row keys/values of the ids in _cached
        self._cached: list[list[int]] = []  # per row, the ids whose keys/values the cache holds

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> "AutoregressiveDrafter":
        """Load a small causal LM (HF id or local directory) as drafter."""
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, tokenizer, name=f"ar:{os.path.basename(str(name_or_path).rstrip('/'))}")

    @classmethod
    def from_target_layers(cls, target: PreTrainedModel, num_layers: int | None = None) -> "AutoregressiveDrafter":
        """Early-exit self-speculation: the target's first ``num_layers`` decoder layers (default: a
        quarter of them), then its final norm and LM head. Shares the target's weights (no copy).

        Works for decoder-only models laid out as ``model.model.layers`` (Llama, Qwen, Mistral, ...).
        """
        body = getattr(target, "model", None)
        layers = getattr(body, "layers", None)
        if layers is None:
            raise ValueError(
                f"{type(target).__name__} has no `model.layers`; early-exit drafting needs a decoder-only stack"
            )
        total = len(layers)
        num_layers = max(1, total // 4) if num_layers is None else num_layers
        if not 1 <= num_layers < total:
            raise ValueError(
                f"num_layers must be in [1, {total - 1}] for a target with {total} layers, got {num_layers}"
            )
        config = copy.deepcopy(target.config)
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
        with torch.device("meta"):
            draft = AutoModelForCausalLM.from_config(config)
        # Replace every submodule by the target's own: the draft owns no weights of its own.
        draft.model.embed_tokens = body.embed_tokens
        draft.model.layers = nn.ModuleList(list(layers)[:num_layers])
        draft.model.norm = body.norm
        if hasattr(body, "rotary_emb"):
            draft.model.rotary_emb = body.rotary_emb
        draft.lm_head = target.lm_head
        stray = [n for n, t in list(draft.named_parameters()) + list(draft.named_buffers()) if t.is_meta]
        if stray:
            raise ValueError(f"early-exit drafter could not share these target tensors: {stray[:5]}")
        return cls(draft, None, name=f"early-exit-{num_layers}")

    @property
    def vocab_size(self) -> int:
        return target_vocab_size(self.model)

    def bind(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        check_vocab_compatible(self.vocab_size, target, self.name)
        if self.tokenizer is not None and tokenizer is not None and self.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"Tokenizer mismatch: drafter '{self.name}' uses a different tokenizer from the target's")
        self.model.to(target.device)

    def kernel_modules(self) -> list[nn.Module]:
        return [self.model]  # an early-exit draft's layers are the target's own (already given kernels)

    def begin(self, rows: list[int], seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        if self._cache is None:
            self._cache = StaticKVCache.for_model(self.model, max(rows) + 1)
        self._cache.start_rows(rows)
        self._cached += [[] for _ in range(self._cache.batch - len(self._cached))]
        for r in rows:
            self._cached[r] = []

    def reorder(self, index: list[int]) -> None:
        if self._cache is not None:
            self._cache.reorder(index)
            self._cached = [self._cached[i] for i in index]

    def _sync(self, seqs: Sequences) -> list[torch.Tensor]:
        """Keep, per row, the longest prefix the cache shares with the committed sequence (at least
        one id left to feed); return each row's ids still to feed."""
        feeds = []
        for r in range(seqs.batch):
            row = seqs.row(r).tolist()
            cached = self._cached[r]
            limit = min(len(cached), len(row) - 1)
            common = 0
            while common < limit and cached[common] == row[common]:
                common += 1
            self._cache.lengths[r] = common
            self._cached[r] = row[:common]
            feeds.append(seqs.row(r)[common:])
        return feeds

    def _forward(self, feeds: list[torch.Tensor]) -> torch.Tensor:
        """Feed each row its ids (ragged, right-padded); return the logits after each row's last one (B, V)."""
        cache = self._cache
        counts = [int(f.numel()) for f in feeds]
        n = max(counts)
        device = self.model.device
        feed = torch.zeros((len(feeds), n), dtype=torch.long, device=device)
        for r, f in enumerate(feeds):
            feed[r, : counts[r]] = f
            self._cached[r] += f.tolist()
        cache.plan(n)
        mask = cache.attention_mask(torch.ones((n, n), dtype=torch.bool, device=device).tril(), self.model.dtype)
        logits = self.model(
            input_ids=feed,
            cache=cache,
            use_cache=True,
            attention_mask=mask,
            position_ids=cache.positions(torch.arange(n, device=device)),
        ).logits  # (B, n, V)
        cache.advance(counts)
        last = torch.tensor([c - 1 for c in counts], device=device)
        return logits[torch.arange(len(feeds), device=device), last].float()

    @torch.inference_mode()
    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        if max_tokens <= 0:
            return DraftProposal.empty(seqs.batch, seqs.device)
        if self._cache is None or self._cache.batch != seqs.batch:
            raise RuntimeError("propose() before begin(): the drafter does not know these rows")
        feeds = self._sync(seqs)
        keyed = sampling.keyed and seqs.keys is not None
        tokens, qs, confidence = [], [], []
        for i in range(max_tokens):
            logits = self._forward(feeds)  # (B, V)
            if keyed:  # the best guess at the target's keyed sample (no q: verified by argmax matching)
                seeds, positions = seqs.keys.at(torch.tensor([i]))
                token, conf = (x[:, 0] for x in keyed_candidates(warp_logits(logits, sampling), seeds, positions, 1))
            else:
                q = probs_from_logits(logits, sampling)
                token = logits.argmax(-1) if sampling.greedy else sample(q, generators)
                conf = (logits.softmax(-1) if sampling.greedy else q).gather(-1, token[:, None]).squeeze(-1)
                qs.append(q)
            tokens.append(token)
            confidence.append(conf)
            feeds = list(token[:, None].to(self.model.device))
        q = torch.stack(qs, 1) if qs else None
        return DraftProposal(torch.stack(tokens, 1), q, torch.stack(confidence, 1), forwards=max_tokens)
