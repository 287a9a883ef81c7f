"""The public API: :class:`DiffusionSpeculator` pairs a target model with a drafter and generates
through the one speculative loop."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.config import GenerationParams, SpeculatorConfig
from dllm_spec.drafters.base import Drafter
from dllm_spec.kernels import pack_linears, packed_available
from dllm_spec.loop import Emitted, Request, StopConditions, speculative_decode
from dllm_spec.policy import BlockLengthPolicy, CostAwarePolicy
from dllm_spec.prompt import PromptEncoder, PromptInput
from dllm_spec.stats import GenerationStats
from dllm_spec.target import DTypeLike, load_target
from dllm_spec.verify.verifier import Verifier


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


def check_generation_args(**kwargs) -> None:
    """Type and range checks of generation arguments (``GenerationParams``' fields) before any work:
    a clear ValueError naming the argument."""
    GenerationParams.build(None, kwargs)


#: candidates per position in the default drafter's draft trees
DEFAULT_TREE_WIDTH = 4


def default_drafter(target: PreTrainedModel) -> Drafter:
    """The drafter used when none is given: when the shipped block-diffusion drafter fits the target
    (the embedded SmolLM2-135M-Instruct), that drafter proposing draft trees of each position's
    ``DEFAULT_TREE_WIDTH`` most likely tokens with prompt lookup's continuation grafted on as one
    more branch (``prompt-lookup+block-diffusion:tree=4``); else prompt lookup alone. The shipped
    drafter (2 layers, a 16-token block, one denoising step) was trained on 2.71M tokens of the
    target's own responses, with top-8 distillation, to held-out offline tau 2.80 (BENCHMARKS.md,
    "Drafter training"); with the cost-aware policy the pair reaches tau 2.94 and 1.94x plain
    decoding on 10 held-out prompts, fp32, on a 2-core CPU (BENCHMARKS.md, "Drafters at batch 1")."""
    from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, target_mismatches
    from dllm_spec.drafters.composite import GraftDrafter
    from dllm_spec.drafters.prompt_lookup import PromptLookupDrafter
    from dllm_spec.drafters.shipped import shipped_drafter_dir

    try:
        path = shipped_drafter_dir()
    except FileNotFoundError:
        return PromptLookupDrafter()
    if target_mismatches(BlockDiffusionConfig.from_pretrained(path), target):  # checked before loading the weights
        return PromptLookupDrafter()
    return GraftDrafter(
        PromptLookupDrafter(), BlockDiffusionDrafter.from_pretrained(path, tree_width=DEFAULT_TREE_WIDTH)
    )


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
        if (
            getattr(target, "dllm_kernels", "default") != "default" and packed_available()
        ):  # the drafter's own linears too
            for module in self.drafter.kernel_modules():
                pack_linears(module, packed_from=getattr(target, "dllm_packed_from", 1))
        self.policy = policy if policy is not None else CostAwarePolicy(max_k=max(1, config.block_size))
        self.policy.bind(target)
        self.drafter.attach_gate(self.policy.request_draft)
        self._verifiers: dict[int, Verifier] = {}  # one per batch size: its cache is reused across calls
        self._encoder = PromptEncoder(tokenizer, target.get_output_embeddings().weight.shape[0], self.context_limit)
        self._lock = threading.Lock()  # one generation at a time (see _exclusive)
        self._owner: int | None = None

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
        with ``drafter``: an instance, a name understood by :func:`dllm_spec.drafters.build_drafter`
        (``"prompt-lookup"``, ``"early-exit[:N]"``, ``"none"``) or a path/id of a drafter checkpoint.
        ``kernels``: ``"auto"`` packs the linear weights for oneDNN where that is faster (fp32 and bf16 on CPU;
        :mod:`dllm_spec.kernels`), ``"packed"`` or ``"default"``."""
        from dllm_spec.drafters import build_drafter

        model, tokenizer = load_target(target, dtype=dtype, device=device, kernels=kernels)
        if drafter is not None and not isinstance(drafter, Drafter):
            drafter = build_drafter(str(drafter), model)
        return cls(model, tokenizer, drafter, config or SpeculatorConfig(), policy)

    # ---- inputs -------------------------------------------------------------------------------
    @property
    def context_limit(self) -> int:
        return int(getattr(self.target.config, "max_position_embeddings", 1 << 30))

    def encode(self, prompt: PromptInput, chat: bool | None = None, system: str | None = None) -> torch.Tensor:
        """Token ids (1, T) on the target's device for ONE prompt (:meth:`PromptEncoder.encode`)."""
        return self._encoder.encode(prompt, chat, system).to(self.target.device)

    def encode_batch(
        self, prompts, attention_mask: torch.Tensor | None = None, chat: bool | None = None, system: str | None = None
    ) -> list[torch.Tensor]:
        """One (T_i,) id tensor per row, on the target's device (:meth:`PromptEncoder.encode_batch`)."""
        return [ids.to(self.target.device) for ids in self._encoder.encode_batch(prompts, attention_mask, chat, system)]

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
        """One sequence with its own seed (a random one, recorded in its stats, when ``seed`` is
        None) and a generator seeded with it."""
        seed = secrets.randbits(63) if seed is None else seed
        generator = torch.Generator(device=self.target.device)
        generator.manual_seed(seed)
        request = Request(ids, generator, seed=seed)
        request.stats.seed = seed
        return request

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One generation at a time: another thread waits its turn; the same thread starting a second
        generation inside an unfinished one (an iterator not yet exhausted) gets a clear error."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "this DiffusionSpeculator is already generating in this thread (an unfinished "
                "generate_iter / stream?): finish or close it first, or use a second speculator"
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _run(
        self, requests: Iterable[Request], max_batch: int, params: GenerationParams, totals: GenerationStats
    ) -> Iterator[Emitted]:
        """The one loop over ``requests``, ``max_batch`` rows at a time, holding the speculator."""
        if max_batch > self.config.max_batch_size:
            raise ValueError(
                f"batch size {max_batch} exceeds the configured max_batch_size={self.config.max_batch_size}"
            )
        stop = StopConditions(
            params.max_new_tokens,
            self._stop_ids(params.stop_token_ids),
            self.context_limit,
            params.min_new_tokens,
            params.ignore_eos,
        )
        with self._exclusive():
            verifier = self._verifiers.get(max_batch)
            if verifier is None:
                verifier = self._verifiers[max_batch] = Verifier(
                    self.target, self.drafter.target_layer_ids, self.config.verification, max_batch=max_batch
                )
            yield from speculative_decode(
                verifier,
                self.drafter,
                self.policy,
                requests,
                stop,
                params.sampling_params(),
                max_batch,
                totals,
                max_draft=self.config.block_size,
            )

    def stream_ids(
        self,
        prompt: PromptInput,
        generation_params: GenerationParams | None = None,
        *,
        stats: GenerationStats | None = None,
        **kwargs,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens (1, n) of each cycle as they are committed (one prompt, one sample).
        Arguments: :class:`GenerationParams`' fields, as keywords or as ``generation_params``."""
        params = GenerationParams.build(generation_params, kwargs)
        if params.num_return_sequences != 1:
            raise ValueError("stream_ids/stream generate one sequence: num_return_sequences must be 1")
        input_ids = self.encode(prompt, params.chat, params.system)
        request = self._request(input_ids[0], params.seed)
        if stats is not None:
            stats.seed = request.seed
            request.stats = stats
        for event in self._run([request], 1, params, GenerationStats()):
            yield event.tokens.unsqueeze(0)

    def generate(
        self,
        prompt: PromptInput | list,
        generation_params: GenerationParams | None = None,
        *,
        streamer=None,
        attention_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
        **kwargs,
    ) -> "GenerationOutput | BatchGenerationOutput":
        """Generate up to ``max_new_tokens`` new tokens for one prompt or a batch.

        ``prompt``: a string (chat-templated unless ``chat=False``), a list of chat messages, a list
        of ids, or input_ids (1, T), used exactly as given: returns a :class:`GenerationOutput`. A
        list of such prompts, or input_ids (B, T) with B > 1 (plus ``attention_mask`` when rows are
        padded), is a batch: returns a :class:`BatchGenerationOutput`, one output per row in input
        order (``num_return_sequences`` N > 1: N per prompt, prompt-major, as transformers orders
        them; a single prompt then also returns a batch). A batch runs ``batch_size`` rows at a
        time (default: all of them, up to the configured ``max_batch_size``) with continuous
        batching. Generation arguments: :class:`GenerationParams`' fields (``max_new_tokens``,
        ``temperature``, ``seed``, ``sampling``, ...), as keywords or as ``generation_params``.
        ``streamer`` (one prompt, one sample): any object with the transformers streamer protocol
        (``put``/``end``); like ``model.generate`` it first receives the prompt ids, then each chunk.
        """
        params = GenerationParams.build(generation_params, kwargs)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("empty prompt: the prompt list is empty")
        _check_batch_size(batch_size)
        batched = (isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.shape[0] > 1) or (
            isinstance(prompt, (list, tuple))
            and bool(prompt)
            and not all(isinstance(t, int) for t in prompt)
            and not all(isinstance(m, dict) for m in prompt)
        )
        if not batched and params.num_return_sequences == 1:
            return self._generate_one(prompt, params, streamer, attention_mask)
        if streamer is not None:
            raise ValueError("streamer works with one prompt and one sample; a batch returns its outputs when done")
        if batched:
            rows = self.encode_batch(prompt, attention_mask, params.chat, params.system)
        else:
            rows = [self._encode_one(prompt, params, attention_mask)[0]]
        if isinstance(prompt, torch.Tensor) and len(rows) > self.config.max_batch_size:
            raise ValueError(
                f"input_ids has {len(rows)} rows, more than the configured max_batch_size={self.config.max_batch_size}"
            )
        n = params.num_return_sequences
        rows = [ids for ids in rows for _ in range(n)]  # the samples of a prompt share its tensor: prefilled once
        outputs: list[GenerationOutput | None] = [None] * len(rows)
        totals = GenerationStats()
        for index, out in self._iterate(
            rows, params, batch_size, [params.row_seed(i) for i in range(len(rows))], totals
        ):
            outputs[index] = out
        return BatchGenerationOutput(outputs, totals)

    def _encode_one(
        self, prompt: PromptInput, params: GenerationParams, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            prompt = torch.as_tensor(prompt).reshape(-1)[torch.as_tensor(attention_mask).reshape(-1).bool()]
        return self.encode(prompt, params.chat, params.system)

    def _generate_one(
        self, prompt: PromptInput, params: GenerationParams, streamer, attention_mask
    ) -> GenerationOutput:
        input_ids = self._encode_one(prompt, params, attention_mask)
        request = self._request(input_ids[0], params.seed)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        chunks = []
        for event in self._run([request], 1, params, GenerationStats()):
            chunks.append(event.tokens)
            if streamer is not None:
                streamer.put(event.tokens.unsqueeze(0))
        if streamer is not None:
            streamer.end()
        return self._output(chunks, request.stats)

    def generate_iter(
        self,
        prompts: list,
        generation_params: GenerationParams | None = None,
        *,
        seeds: list[int | None] | None = None,
        batch_size: int | None = None,
        totals: GenerationStats | None = None,
        **kwargs,
    ) -> Iterator[tuple[int, GenerationOutput]]:
        """Generate a list of prompts with continuous batching and yield ``(index, output)`` for each
        as soon as it finishes (completion order), so a long job can save every result at once.
        With ``num_return_sequences`` N, index i * N + j is prompt i's sample j. ``seeds``: one per
        output row (None: a random seed, recorded in the output's stats), instead of ``seed + row``;
        the rest as in :meth:`generate`."""
        params = GenerationParams.build(generation_params, kwargs)
        _check_batch_size(batch_size)
        n = params.num_return_sequences
        if seeds is not None:
            if len(seeds) != len(prompts) * n:
                raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts x {n} samples")
            for s in seeds:
                GenerationParams(seed=s)
        else:
            seeds = [params.row_seed(i) for i in range(len(prompts) * n)]
        rows = [ids for ids in self.encode_batch(prompts, None, params.chat, params.system) for _ in range(n)]
        yield from self._iterate(rows, params, batch_size, seeds, totals or GenerationStats())

    def _iterate(
        self,
        rows: list[torch.Tensor],
        params: GenerationParams,
        batch_size: int | None,
        seeds: list[int | None],
        totals: GenerationStats,
    ) -> Iterator[tuple[int, GenerationOutput]]:
        slots = min(len(rows), batch_size or self.config.max_batch_size)
        requests = [self._request(ids, seed) for ids, seed in zip(rows, seeds)]
        chunks: list[list[torch.Tensor]] = [[] for _ in rows]
        for event in self._run(requests, slots, params, totals):
            chunks[event.request].append(event.tokens)
            if event.finished:
                yield event.request, self._output(chunks[event.request], requests[event.request].stats)
                chunks[event.request] = []

    def _output(self, chunks: list[torch.Tensor], stats: GenerationStats) -> GenerationOutput:
        token_ids = torch.cat(chunks).unsqueeze(0) if chunks else torch.zeros((1, 0), dtype=torch.long)
        text = self.tokenizer.decode(token_ids[0], skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationOutput(text, token_ids, stats)

    def stream(self, prompt: PromptInput, **kwargs) -> Iterator[str]:
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
            yield text[len(emitted) :]
            emitted = text
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text != emitted:  # generation ended inside a multi-byte character: say what generate() says
            yield text[len(emitted) :]


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
