"""The public API: :class:`DiffusionSpeculator` pairs a target model with a drafter and generates
through the one speculative loop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.config import SpeculatorConfig
from dllm_spec.loop import StopConditions, speculative_decode
from dllm_spec.policy import BlockLengthPolicy, CostAwarePolicy
from dllm_spec.stats import GenerationStats
from dllm_spec.target import DTypeLike, load_target
from drafters.base import Drafter
from verify.sampling import SamplingParams
from verify.verifier import Verifier

Prompt = str | torch.Tensor | list[dict]


@dataclass
class GenerationOutput:
    """text: decoded new tokens; token_ids: (B, n) the new tokens only; stats: counters and timings."""

    text: str
    token_ids: torch.Tensor
    stats: GenerationStats


#: candidates per position in the default drafter's draft trees
DEFAULT_TREE_WIDTH = 4


def default_drafter(target: PreTrainedModel) -> Drafter:
    """The drafter used when none is given: when the shipped block-diffusion drafter fits the target
    (the embedded SmolLM2-135M-Instruct), that drafter proposing draft trees of each position's
    ``DEFAULT_TREE_WIDTH`` most likely tokens with prompt lookup's continuation grafted on as one
    more branch (``prompt-lookup+block-diffusion:tree=4``); else prompt lookup alone. On 10 held-out
    prompts on a 2-core CPU (BENCHMARKS.md, "Draft trees") it reached tau 3.5 and 2.36x plain AR in
    bf16, against tau 2.1 and 1.86x for the same pair drafting chains."""
    from drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, target_mismatches
    from drafters.fallback import FallbackDrafter
    from drafters.prompt_lookup import PromptLookupDrafter
    from drafters.shipped import shipped_drafter_dir

    try:
        path = shipped_drafter_dir()
    except FileNotFoundError:
        return PromptLookupDrafter()
    if target_mismatches(BlockDiffusionConfig.from_pretrained(path), target):  # checked before loading the weights
        return PromptLookupDrafter()
    return FallbackDrafter(PromptLookupDrafter(), BlockDiffusionDrafter.from_pretrained(path, tree_width=DEFAULT_TREE_WIDTH))


class DiffusionSpeculator:
    """Lossless speculative generation: a drafter proposes, the target verifies in one forward.

    Greedy output is identical to the target's own greedy decoding (exactly in fp32; in bf16 up
    to floating-point near-ties, since a k-token forward may round differently from k one-token
    forwards). Sampled output follows the target's distribution.
    """

    def __init__(
        self,
        target: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        drafter: Drafter | None = None,
        config: SpeculatorConfig = SpeculatorConfig(),
        policy: BlockLengthPolicy | None = None,
    ) -> None:
        self.target = target.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.drafter = drafter if drafter is not None else default_drafter(target)
        self.drafter.bind(target, tokenizer)
        self.policy = policy if policy is not None else CostAwarePolicy(max_k=max(1, config.block_size))
        self.policy.bind(target)
        self.drafter.attach_gate(self.policy.should_draft)

    @classmethod
    def from_pretrained(
        cls,
        target: str | os.PathLike | None = None,
        drafter: Drafter | str | os.PathLike | None = None,
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        config: SpeculatorConfig | None = None,
        policy: BlockLengthPolicy | None = None,
    ) -> "DiffusionSpeculator":
        """Load a target (HF id/path, or ``None`` for the embedded SmolLM2-135M-Instruct) and pair it
        with ``drafter``: an instance, a name understood by :func:`drafters.build_drafter`
        (``"prompt-lookup"``, ``"early-exit[:N]"``, ``"none"``) or a path/id of a drafter checkpoint."""
        from drafters import build_drafter

        model, tokenizer = load_target(target, dtype=dtype, device=device)
        if drafter is not None and not isinstance(drafter, Drafter):
            drafter = build_drafter(str(drafter), model)
        return cls(model, tokenizer, drafter, config or SpeculatorConfig(), policy)

    # ---- inputs -------------------------------------------------------------------------------
    @property
    def context_limit(self) -> int:
        return int(getattr(self.target.config, "max_position_embeddings", 1 << 30))

    def encode(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> torch.Tensor:
        """Token ids (1, T) for a prompt. Strings (and message lists) go through the chat template
        when the tokenizer has one (``chat=None``/``True``); ``chat=False`` sends raw text. A tensor
        is used exactly as given."""
        if isinstance(prompt, torch.Tensor):
            ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
            if ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor, got {ids.dtype}")
            ids = ids.long()
        else:
            if self.tokenizer is None:
                raise ValueError("this speculator has no tokenizer: pass input_ids as a LongTensor of shape (1, T)")
            if isinstance(prompt, str) and not prompt.strip():
                raise ValueError("empty prompt: give a non-empty string or input_ids")
            use_chat = (chat is None or chat) and getattr(self.tokenizer, "chat_template", None)
            if chat and not use_chat:
                raise ValueError("chat=True but the tokenizer has no chat template")
            if use_chat:
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                if system is not None:
                    messages = [{"role": "system", "content": system}, *messages]
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            else:
                if isinstance(prompt, list):
                    raise ValueError("a list of chat messages needs chat=True and a tokenizer with a chat template")
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids = torch.tensor([ids], dtype=torch.long)
        if ids.shape[0] != 1:
            raise ValueError(f"batch size {ids.shape[0]} is not supported yet: pass input_ids of shape (1, T)")
        if ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        vocab = self.target.get_output_embeddings().weight.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"input_ids contain ids outside the target's vocabulary [0, {vocab})")
        if ids.shape[1] >= self.context_limit:
            raise ValueError(
                f"prompt too long: {ids.shape[1]} tokens, the model's context is {self.context_limit} "
                "(and at least one new token must fit)"
            )
        return ids.to(self.target.device)

    def _stop_ids(self, extra: list[int] | None) -> frozenset[int]:
        ids: set[int] = set(extra or [])
        for source in (getattr(self.target, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(e) for e in eos)
        return frozenset(ids)

    # ---- generation ---------------------------------------------------------------------------
    def stream_ids(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool | None = None,
        system: str | None = None,
        stop_token_ids: list[int] | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens (1, n) of each cycle as they are committed."""
        sampling = SamplingParams(temperature, top_k, top_p)
        stop = StopConditions(max_new_tokens, self._stop_ids(stop_token_ids), self.context_limit)
        input_ids = self.encode(prompt, chat, system)
        generator = torch.Generator(device=input_ids.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        verifier = Verifier(self.target, self.drafter.target_layer_ids, self.config.verification)
        yield from speculative_decode(
            verifier, self.drafter, self.policy, input_ids, stop, sampling, generator,
            stats if stats is not None else GenerationStats(),
        )

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer=None,
        chat: bool | None = None,
        system: str | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` new tokens.

        ``prompt``: a string (chat-templated unless ``chat=False``), a list of chat messages, or
        input_ids (1, T) used exactly as given. ``streamer``: any object with the transformers
        streamer protocol (``put``/``end``, e.g. ``TextStreamer(tok, skip_prompt=True)``); like
        ``model.generate`` it first receives the prompt ids, then each committed chunk.
        """
        stats = GenerationStats()
        chunks = []
        input_ids = self.encode(prompt, chat, system)  # a tensor is used as given below: encoded once
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for chunk in self.stream_ids(input_ids, max_new_tokens, temperature, top_k, top_p, seed, chat, system, stop_token_ids, stats):
            chunks.append(chunk)
            if streamer is not None:
                streamer.put(chunk.cpu())
        if streamer is not None:
            streamer.end()
        token_ids = torch.cat(chunks, dim=1) if chunks else torch.zeros((1, 0), dtype=torch.long)
        text = self.tokenizer.decode(token_ids[0], skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationOutput(text, token_ids, stats)

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[str]:
        """Yield decoded text pieces as tokens are committed (same arguments as :meth:`generate`)."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer")
        ids: list[int] = []
        emitted = ""
        for chunk in self.stream_ids(prompt, **kwargs):
            ids.extend(chunk[0].tolist())
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            yield text[len(emitted):]
            emitted = text
