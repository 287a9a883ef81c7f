"""The one generate loop: prefill, then draft -> verify -> commit -> resync until a stop, for a
batch of sequences with continuous batching.

Every drafter, every acceptance rule and every batch size runs through :func:`speculative_decode`;
plain autoregressive decoding is the same loop with a drafter that proposes nothing, and batch 1 is
a batch of one.

Glossary:
    request: one sequence to generate (prompt ids, its generator, its stats).
    slot / row: where an active request lives in the verifier's and the drafter's caches; active
        rows are a dense prefix 0 .. b-1.
    cycle: one draft + one target forward over every active row; rows commit ragged counts.

When a row stops (a stop id, ``max_new_tokens``, the model's context) the next waiting request
takes its slot and is prefilled before the next cycle, so the batch stays full; when none waits,
the finished rows leave and the rest are moved down (only the rows that move are copied).

The loop in steps: :func:`_admit` (refill, compact, grow, prefill), :func:`_draft`, the verifier's
``verify``, :func:`_commit_row` per row (stop ids, budgets, stats), then the drafter's ``commit``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

from dllm_spec.drafters.base import Drafter, DraftProposal, Sequences
from dllm_spec.policy import BlockLengthPolicy
from dllm_spec.stats import GenerationStats
from dllm_spec.timing import CycleClock, wall_clock
from dllm_spec.verify.keyed import NoiseKeys
from dllm_spec.verify.sampling import SamplingParams
from dllm_spec.verify.verifier import Verifier


@dataclass(frozen=True)
class StopConditions:
    """max_new_tokens: exact cap; stop_token_ids: ids that end generation (emitted, then stop);
    context_limit: the model's maximum sequence length; min_new_tokens: stop ids are suppressed
    (their logits set to -inf, as transformers' ``min_new_tokens`` does) until a row has this many
    new tokens; ignore_eos: never stop at a stop id, emit it and go on (vLLM's ``ignore_eos``)."""

    max_new_tokens: int
    stop_token_ids: frozenset[int]
    context_limit: int
    min_new_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )


@dataclass
class Request:
    """One sequence: ``input_ids`` (T,) long, its own ``generator`` (a row's draws never depend on
    its batch neighbours), its ``seed`` (the key of reproducible sampling: required then) and its
    ``stats``."""

    input_ids: torch.Tensor
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    seed: int | None = None


@dataclass(frozen=True)
class Emitted:
    """What one cycle committed for one request: ``tokens`` (n,) with n >= 1; ``finished`` when the
    request stopped (its ``stats.stop_reason`` says why)."""

    request: int
    tokens: torch.Tensor
    finished: bool


def _first_stop(tokens: list[int], stop_ids: frozenset[int]) -> int | None:
    """Index of the first stop id in a list, or None."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i
    return None


@dataclass
class _Row:
    request: int
    generated: int = 0
    started: float = 0.0


class _Slots:
    """The active rows: each slot's request and its committed tokens, position-indexed
    (``ids[r, :lengths[r]]``), rows 0 .. b-1 dense."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.device = device
        self.ids = torch.zeros((max_batch, 256), dtype=torch.long, device=device)
        self.lengths: list[int] = []
        self.rows: list[_Row] = []
        self.requests: dict[int, Request] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def request(self, r: int) -> Request:
        return self.requests[self.rows[r].request]

    def write(self, r: int, tokens: torch.Tensor) -> None:
        """Append ``tokens`` (n,) to row r, growing the id buffer when needed."""
        end = self.lengths[r] + tokens.numel()
        if end > self.ids.shape[1]:
            grown = torch.zeros((self.max_batch, max(end, 2 * self.ids.shape[1])), dtype=torch.long, device=self.device)
            grown[:, : self.ids.shape[1]] = self.ids
            self.ids = grown
        self.ids[r, self.lengths[r] : end] = tokens
        self.lengths[r] = end

    def place(self, row: int, index: int, request: Request, now: float) -> None:
        """Start request ``index`` in slot ``row`` (a refilled slot or the next new one)."""
        self.requests[index] = request
        if row == len(self.rows):
            self.rows.append(_Row(index))
            self.lengths.append(0)
        else:
            self.rows[row] = _Row(index)
            self.lengths[row] = 0
        self.rows[row].started = now
        self.write(row, request.input_ids.to(self.device))

    def keep(self, index: list[int]) -> None:
        """Keep rows ``index`` (new row i = old row index[i])."""
        self.ids[: len(index)] = self.ids[torch.tensor(index, dtype=torch.long, device=self.device)]
        self.lengths = [self.lengths[i] for i in index]
        self.rows = [self.rows[i] for i in index]

    def sequences(self, sampling: SamplingParams) -> Sequences:
        """The drafter's view; with each row's noise keys in reproducible sampling."""
        keys = None
        if sampling.keyed:
            seeds = torch.tensor(
                [self.request(r).seed for r in range(len(self.rows))], dtype=torch.long, device=self.device
            )
            keys = NoiseKeys(seeds, torch.tensor(self.lengths, dtype=torch.long, device=self.device))
        return Sequences(self.ids, self.lengths, keys)


@dataclass
class _Run:
    """What one call of :func:`speculative_decode` works with."""

    verifier: Verifier
    drafter: Drafter
    policy: BlockLengthPolicy
    stop: StopConditions
    sampling: SamplingParams
    totals: GenerationStats
    clock: CycleClock
    cap: int  # drafts per cycle, whatever the policy asks
    ban: list[int]  # stop ids suppressed until min_new_tokens


def speculative_decode(
    verifier: Verifier,
    drafter: Drafter,
    policy: BlockLengthPolicy,
    requests: Iterable[Request],
    stop: StopConditions,
    sampling: SamplingParams,
    max_batch: int = 1,
    totals: GenerationStats | None = None,
    max_draft: int | None = None,
) -> Iterator[Emitted]:
    """Generate every request, at most ``max_batch`` at a time; yield what each cycle commits.

    Never yields a token past a row's first stop id or past ``max_new_tokens``, even when a verified
    block accepted more. Each request's ``stats`` is filled in as the loop runs; ``totals``, when
    given, gets the batch-level counters (target forwards = cycles, new tokens of all rows).
    ``max_draft`` caps the tokens (tree nodes) drafted per cycle whatever the policy asks
    (``SpeculatorConfig.block_size``; 0 is plain decoding).
    """
    device = verifier.model.device
    totals = totals if totals is not None else GenerationStats()
    totals.drafter = drafter.name
    run = _Run(
        verifier,
        drafter,
        policy,
        stop,
        sampling,
        totals,
        CycleClock(device),
        stop.context_limit if max_draft is None else max_draft,
        sorted(stop.stop_token_ids) if stop.min_new_tokens else [],
    )
    policy.prepare(max_batch)
    verifier.reset()
    drafter.reorder([])  # forget the rows of any earlier batch
    slots = _Slots(max_batch, device)
    pending = enumerate(requests)
    finished: list[int] = []  # rows whose request stopped in the last cycle
    start = wall_clock(device)
    try:
        while True:
            _admit(run, slots, pending, finished)
            if not slots:
                return
            finished = yield from _cycle(run, slots)
    finally:
        totals.wall_time_s = wall_clock(device) - start


def _admit(run: _Run, slots: _Slots, pending: Iterator[tuple[int, Request]], finished: list[int]) -> None:
    """Refill the slots of finished rows from ``pending``, move the active rows down over the slots
    nobody waits for, grow the batch up to ``max_batch``, and prefill every new row."""
    free = sorted(finished)
    starting = [(free.pop(0), *item) for item in islice(pending, len(free))]  # (row, request index, request)
    if free:  # nobody waits for these slots: move the active rows down over them
        index = sorted([r for r in range(len(slots)) if r not in finished] + [r for r, _, _ in starting])
        remap = {old: new for new, old in enumerate(index)}
        run.verifier.reorder(index)
        run.drafter.reorder(index)
        slots.keep(index)
        starting = [(remap[r], i, q) for r, i, q in starting]
    starting += [(len(slots) + n, *item) for n, item in enumerate(islice(pending, slots.max_batch - len(slots)))]
    if not starting:
        return
    now = wall_clock(slots.device)
    for row, index, request in starting:
        slots.place(row, index, request, now)
        request.stats.prompt_tokens = int(request.input_ids.numel())
        request.stats.drafter = run.drafter.name
    rows = [row for row, _, _ in starting]
    _, features, counts = run.verifier.prefill([q.input_ids for _, _, q in starting], rows)
    run.drafter.begin(rows, Sequences(slots.ids, slots.lengths), features, counts)
    done = wall_clock(slots.device)
    for _, _, request in starting:
        request.stats.prefill_time_s = done - now


def _draft(
    run: _Run, seqs: Sequences, gens: list, limits: list[int], rooms: list[int]
) -> tuple[DraftProposal, DraftProposal]:
    """The drafter's proposal for every active row cut to what may be accepted, and that proposal
    cut to what the policy chooses to verify."""
    b = seqs.batch
    k = max(0, min(run.policy.begin_cycle(b), max(rooms) - 1, run.cap))  # tokens (tree nodes) fed besides the last
    if run.drafter.tree_width == 1:
        k = min(k, max(limits))  # a chain's length is its depth
    drafted = run.drafter.propose(seqs, k, run.sampling, gens) if k > 0 else DraftProposal.empty(b, seqs.device)
    drafted = drafted.limit_depth(limits)  # never accept past max_new_tokens or the context
    return drafted, drafted.truncate([min(k, v) for v in run.policy.choose(drafted)])


def _cycle(run: _Run, slots: _Slots) -> Iterator[Emitted]:
    """One draft + one target forward over every active row; yields each row's committed tokens and
    returns the rows that finished."""
    b = len(slots)
    seqs = slots.sequences(run.sampling)
    budgets = [run.stop.max_new_tokens - row.generated for row in slots.rows]
    rooms = [run.stop.context_limit - n for n in slots.lengths]
    limits = [max(0, min(budget, room) - 1) for budget, room in zip(budgets, rooms)]  # drafts each row may accept
    gens = [slots.request(r).generator for r in range(b)]
    t0 = run.clock.mark()
    drafted, proposal = _draft(run, seqs, gens, limits, rooms)
    t1 = run.clock.mark()
    banned = [max(0, run.stop.min_new_tokens - row.generated) for row in slots.rows] if run.ban else None
    outcome = run.verifier.verify(
        seqs.last(), proposal, run.sampling, gens, banned_ids=run.ban, banned_until=banned, keys=seqs.keys
    )
    t2 = run.clock.mark()
    draft_s, verify_s = run.clock.seconds(t0, t1), run.clock.seconds(t1, t2)
    _observe(run, drafted, proposal, outcome.num_accepted, outcome.paths, draft_s, verify_s)
    next_tokens, drafts = outcome.next_token.tolist(), outcome.tokens.tolist()
    predictions = run.policy.last_predictions
    finished = []
    for r in range(b):
        new = drafts[r][: outcome.num_accepted[r]] + [next_tokens[r]]
        stats = slots.request(r).stats
        stats.draft_time_s += draft_s
        stats.verify_time_s += verify_s
        stats.draft_forwards += proposal.forwards
        stats.record_cycle(
            proposal.lengths[r],
            outcome.num_accepted[r],
            None if predictions is None else predictions[r],
            proposal.row_depth(r),
        )
        event = _commit_row(run, slots, r, new, budgets[r])
        if event.finished:
            finished.append(r)
        yield event
    run.drafter.commit(Sequences(slots.ids, slots.lengths), outcome.features, outcome.feature_counts)
    return finished


def _observe(
    run: _Run,
    drafted: DraftProposal,
    proposal: DraftProposal,
    accepted: list[int],
    paths: torch.Tensor,
    draft_s: float,
    verify_s: float,
) -> None:
    """Tell the policy what the cycle drafted, verified, cost and accepted; add the batch-level counters."""
    b = proposal.batch
    row_paths = [paths[r, : accepted[r]] for r in range(b)] if proposal.is_tree else None
    run.policy.observe(drafted, proposal.lengths, accepted, draft_s, verify_s, paths=row_paths)
    totals = run.totals
    totals.draft_time_s += draft_s
    totals.verify_time_s += verify_s
    totals.draft_forwards += proposal.forwards
    totals.target_forwards += 1
    totals.row_forwards += b
    totals.verified_tokens += sum(proposal.lengths)
    totals.accepted_tokens += sum(accepted)


def _commit_row(run: _Run, slots: _Slots, r: int, new: list[int], budget: int) -> Emitted:
    """Append row r's accepted tokens + the target's own, cut at its first stop id and its budget;
    mark it finished when it stopped (eos, length, context)."""
    row, stop = slots.rows[r], run.stop
    stats = slots.request(r).stats
    cut = None if stop.ignore_eos else _first_stop(new, stop.stop_token_ids)
    hit_stop = cut is not None and cut < budget
    new = new[: min(budget, cut + 1 if hit_stop else budget)]
    slots.write(r, torch.tensor(new, dtype=torch.long, device=slots.device))
    row.generated += len(new)
    stats.new_tokens = row.generated
    run.totals.new_tokens += len(new)
    reason = "eos" if hit_stop else ("length" if len(new) == budget else None)
    if reason is None and slots.lengths[r] >= stop.context_limit:
        reason = "context"
    if reason is not None:
        stats.stop_reason = reason
        stats.wall_time_s = wall_clock(slots.device) - row.started
    return Emitted(row.request, torch.tensor(new, dtype=torch.long), reason is not None)
