"""The public API: :class:`DiffusionSpeculator` pairs a target model with a drafter and generates
through the one speculative loop."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.config import SpeculatorConfig
from dllm_spec.kernels import pack_linears, packed_available
from dllm_spec.loop import Emitted, Request, StopConditions, speculative_decode
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


@dataclass
class BatchGenerationOutput:
    """One :class:`GenerationOutput` per row (input order) and the batch's aggregate ``stats``
    (``new_tokens`` of every row, ``target_forwards`` = batched cycles, ``wall_time_s`` of the whole run)."""

    outputs: list[GenerationOutput]
    stats: GenerationStats

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, i: int) -> GenerationOutput:
        return self.outputs[i]

    def __iter__(self):
        return iter(self.outputs)

    @property
    def texts(self) -> list[str]:
        return [o.text for o in self.outputs]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_generation_args(*, max_new_tokens, temperature, top_k, top_p, seed, min_new_tokens=0, ignore_eos=False) -> None:
    """Type and range checks at the API boundary, before any work (a clear ValueError naming the argument)."""
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"ignore_eos must be True or False, got {ignore_eos!r}")


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
    from drafters.composite import GraftDrafter
    from drafters.prompt_lookup import PromptLookupDrafter
    from drafters.shipped import shipped_drafter_dir

    try:
        path = shipped_drafter_dir()
    except FileNotFoundError:
        return PromptLookupDrafter()
    if target_mismatches(BlockDiffusionConfig.from_pretrained(path), target):  # checked before loading the weights
        return PromptLookupDrafter()
    return GraftDrafter(PromptLookupDrafter(), BlockDiffusionDrafter.from_pretrained(path, tree_width=DEFAULT_TREE_WIDTH))


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
        if getattr(target, "dllm_kernels", "default") != "default" and packed_available():  # the drafter's own linears too
            for module in self.drafter.kernel_modules():
                pack_linears(module)
        self.policy = policy if policy is not None else CostAwarePolicy(max_k=max(1, config.block_size))
        self.policy.bind(target)
        self.drafter.attach_gate(self.policy.request_draft)
        self._verifiers: dict[int, Verifier] = {}  # one per batch size: its cache is reused across calls

    @classmethod
    def from_pretrained(
        cls,
        target: str | os.PathLike | None = None,
        drafter: Drafter | str | os.PathLike | None = None,
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        config: SpeculatorConfig | None = None,
        policy: BlockLengthPolicy | None = None,
        kernels: str = "auto",
    ) -> "DiffusionSpeculator":
        """Load a target (HF id/path, or ``None`` for the embedded SmolLM2-135M-Instruct) and pair it
        with ``drafter``: an instance, a name understood by :func:`drafters.build_drafter`
        (``"prompt-lookup"``, ``"early-exit[:N]"``, ``"none"``) or a path/id of a drafter checkpoint.
        ``kernels``: ``"auto"`` packs the linear weights for oneDNN where that is faster (fp32 and bf16 on CPU;
        :mod:`dllm_spec.kernels`), ``"packed"`` or ``"default"``."""
        from drafters import build_drafter

        model, tokenizer = load_target(target, dtype=dtype, device=device, kernels=kernels)
        if drafter is not None and not isinstance(drafter, Drafter):
            drafter = build_drafter(str(drafter), model)
        return cls(model, tokenizer, drafter, config or SpeculatorConfig(), policy)

    # ---- inputs -------------------------------------------------------------------------------
    @property
    def context_limit(self) -> int:
        return int(getattr(self.target.config, "max_position_embeddings", 1 << 30))

    def encode(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> torch.Tensor:
        """Token ids (1, T) for ONE prompt. Strings (and message lists) go through the chat template
        when the tokenizer has one (``chat=None``/``True``); ``chat=False`` sends raw text. A tensor
        (1, T) or (T,), or a list of ints, is used exactly as given."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = torch.tensor(prompt, dtype=torch.long)
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() not in (1, 2) or (prompt.dim() == 2 and prompt.shape[0] != 1):
                raise ValueError(f"input_ids for one prompt must be (T,) or (1, T), got shape {tuple(prompt.shape)}")
            ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be an integer tensor, got {ids.dtype}")
            ids = ids.long()
        else:
            if not isinstance(prompt, (str, list)):
                raise ValueError(f"prompt must be a string, a list of chat messages, a list of ids or input_ids, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("this speculator has no tokenizer: pass input_ids as a LongTensor of shape (1, T)")
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ValueError("empty prompt: give a non-empty string or input_ids")
            elif isinstance(prompt, list):
                for i, m in enumerate(prompt):
                    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                        raise ValueError(f"prompt message {i} must be a dict with string 'role' and 'content', got {m!r}")
                if not prompt:
                    raise ValueError("empty prompt: the message list is empty")
            else:
                raise ValueError(f"prompt must be a string, a list of chat messages, a list of ids or input_ids, got {type(prompt).__name__}")
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

    def encode_batch(self, prompts, attention_mask: torch.Tensor | None = None, chat: bool | None = None,
                     system: str | None = None) -> list[torch.Tensor]:
        """One (T_i,) id tensor per row: ``prompts`` is a list of prompts (each as for :meth:`encode`),
        or input_ids (B, T) with an ``attention_mask`` (B, T) whose zeros mark padding (either side)."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"batched input_ids must be (B, T), got shape {tuple(prompts.shape)}")
            if attention_mask is None:
                pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
                if pad is not None and prompts.shape[0] > 1:
                    edges = (prompts[:, 0] == pad) | (prompts[:, -1] == pad)
                    if bool(edges.any()) and not bool(edges.all()):
                        raise ValueError("input_ids (B, T) look padded (some rows start or end with the pad id): pass attention_mask")
                return [self.encode(row)[0] for row in prompts]
            if attention_mask.shape != prompts.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(prompts.shape)}")
            rows = []
            for r in range(prompts.shape[0]):
                keep = attention_mask[r].bool()
                if not bool(keep.any()):
                    raise ValueError(f"row {r} of input_ids is empty: its attention_mask is all zeros")
                rows.append(self.encode(prompts[r][keep])[0])
            return rows
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("a batch is a non-empty list of prompts or input_ids (B, T)")
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids (B, T), not with a list of prompts")
        out = []
        for i, p in enumerate(prompts):
            try:
                out.append(self.encode(p, chat, system)[0])
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        return out

    def _stop_ids(self, extra: list[int] | None) -> frozenset[int]:
        vocab = self.target.get_output_embeddings().weight.shape[0]
        ids: set[int] = set()
        for t in extra or []:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"stop_token_ids must be ids in [0, {vocab}), got {t!r}")
            ids.add(t)
        for source in (getattr(self.target, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(e) for e in eos)
        return frozenset(ids)

    # ---- generation ---------------------------------------------------------------------------
    def _request(self, ids: torch.Tensor, seed: int | None) -> Request:
        """One sequence with its own generator (seeded, or random when ``seed`` is None)."""
        generator = torch.Generator(device=self.target.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return Request(ids, generator)

    def _run(self, requests: Iterable[Request], max_batch: int, sampling: SamplingParams, stop: StopConditions,
             totals: GenerationStats) -> Iterator[Emitted]:
        if max_batch > self.config.max_batch_size:
            raise ValueError(f"batch size {max_batch} exceeds the configured max_batch_size={self.config.max_batch_size}")
        verifier = self._verifiers.get(max_batch)
        if verifier is None:
            verifier = self._verifiers[max_batch] = Verifier(self.target, self.drafter.target_layer_ids, self.config.verification,
                                                             max_batch=max_batch)
        return speculative_decode(verifier, self.drafter, self.policy, requests, stop, sampling, max_batch, totals,
                                  max_draft=self.config.block_size)

    def _conditions(self, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, min_new_tokens, ignore_eos):
        check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              min_new_tokens=min_new_tokens, ignore_eos=ignore_eos)
        sampling = SamplingParams(float(temperature), top_k, float(top_p))
        stop = StopConditions(max_new_tokens, self._stop_ids(stop_token_ids), self.context_limit, min_new_tokens, ignore_eos)
        return sampling, stop

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
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens (1, n) of each cycle as they are committed (one prompt)."""
        sampling, stop = self._conditions(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, min_new_tokens, ignore_eos)
        input_ids = self.encode(prompt, chat, system)
        request = self._request(input_ids[0], seed)
        if stats is not None:
            request.stats = stats
        for event in self._run([request], 1, sampling, stop, GenerationStats()):
            yield event.tokens.unsqueeze(0)

    def generate(
        self,
        prompt: Prompt | list,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer=None,
        chat: bool | None = None,
        system: str | None = None,
        stop_token_ids: list[int] | None = None,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
        attention_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> "GenerationOutput | BatchGenerationOutput":
        """Generate up to ``max_new_tokens`` new tokens for one prompt or a batch.

        ``prompt``: a string (chat-templated unless ``chat=False``), a list of chat messages, a list
        of ids, or input_ids (1, T), used exactly as given: returns a :class:`GenerationOutput`. A
        list of such prompts, or input_ids (B, T) with B > 1 (plus ``attention_mask`` when rows are
        padded), is a batch: returns a :class:`BatchGenerationOutput`, one output per row in input
        order. A batch runs ``batch_size`` rows at a time (default: all of them, up to the
        configured ``max_batch_size``) with continuous batching: when a row stops, the next prompt
        takes its slot. ``min_new_tokens``: stop ids are suppressed until a row has that many new
        tokens; ``ignore_eos``: stop ids do not end generation (long-output studies). ``streamer``
        (one prompt only): any object with the transformers streamer protocol (``put``/``end``);
        like ``model.generate`` it first receives the prompt ids, then each committed chunk.
        """
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("empty prompt: the prompt list is empty")
        batched = (isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.shape[0] > 1) or (
            isinstance(prompt, (list, tuple)) and bool(prompt) and not all(isinstance(t, int) for t in prompt)
            and not all(isinstance(m, dict) for m in prompt))
        sampling, stop = self._conditions(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, min_new_tokens, ignore_eos)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not batched:
            if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
                prompt = torch.as_tensor(prompt).reshape(-1)[torch.as_tensor(attention_mask).reshape(-1).bool()]
            input_ids = self.encode(prompt, chat, system)
            request = self._request(input_ids[0], seed)
            if streamer is not None:
                streamer.put(input_ids.cpu())
            chunks = []
            for event in self._run([request], 1, sampling, stop, GenerationStats()):
                chunks.append(event.tokens)
                if streamer is not None:
                    streamer.put(event.tokens.unsqueeze(0))
            if streamer is not None:
                streamer.end()
            return self._output(chunks, request.stats)
        if streamer is not None:
            raise ValueError("streamer works with one prompt; a batch returns its outputs when done")
        rows = self.encode_batch(prompt, attention_mask, chat, system)
        if isinstance(prompt, torch.Tensor) and len(rows) > self.config.max_batch_size:
            raise ValueError(f"input_ids has {len(rows)} rows, more than the configured max_batch_size={self.config.max_batch_size}")
        outputs: list[GenerationOutput | None] = [None] * len(rows)
        totals = GenerationStats()
        for index, out in self._iterate(rows, sampling, stop, batch_size, [None if seed is None else seed + i for i in range(len(rows))],
                                        totals):
            outputs[index] = out
        return BatchGenerationOutput(outputs, totals)

    def generate_iter(
        self,
        prompts: list,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seeds: list[int | None] | None = None,
        stop_token_ids: list[int] | None = None,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
        batch_size: int | None = None,
        chat: bool | None = None,
        system: str | None = None,
        totals: GenerationStats | None = None,
    ) -> Iterator[tuple[int, GenerationOutput]]:
        """Generate a list of prompts with continuous batching and yield ``(index, output)`` for each
        as soon as it finishes (completion order), so a long job can save every result at once.
        ``seeds``: one per prompt (None: a random seed); the rest as in :meth:`generate`."""
        sampling, stop = self._conditions(max_new_tokens, temperature, top_k, top_p, None, stop_token_ids, min_new_tokens, ignore_eos)
        if seeds is not None:
            if len(seeds) != len(prompts):
                raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
            for s in seeds:
                check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
        rows = self.encode_batch(prompts, None, chat, system)
        yield from self._iterate(rows, sampling, stop, batch_size, seeds or [None] * len(rows), totals or GenerationStats())

    def _iterate(self, rows: list[torch.Tensor], sampling: SamplingParams, stop: StopConditions, batch_size: int | None,
                 seeds: list[int | None], totals: GenerationStats) -> Iterator[tuple[int, GenerationOutput]]:
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        slots = min(len(rows), batch_size or self.config.max_batch_size)
        requests = [self._request(ids, seed) for ids, seed in zip(rows, seeds)]
        chunks: list[list[torch.Tensor]] = [[] for _ in rows]
        for event in self._run(requests, slots, sampling, stop, totals):
            chunks[event.request].append(event.tokens)
            if event.finished:
                yield event.request, self._output(chunks[event.request], requests[event.request].stats)
                chunks[event.request] = []

    def _output(self, chunks: list[torch.Tensor], stats: GenerationStats) -> GenerationOutput:
        token_ids = torch.cat(chunks).unsqueeze(0) if chunks else torch.zeros((1, 0), dtype=torch.long)
        text = self.tokenizer.decode(token_ids[0], skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationOutput(text, token_ids, stats)

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[str]:
        """Yield decoded text pieces as tokens are committed (same arguments as :meth:`generate`, one
        prompt). The pieces join to exactly ``generate(prompt).text``."""
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
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text != emitted:  # generation ended inside a multi-byte character: say what generate() says
            yield text[len(emitted):]
