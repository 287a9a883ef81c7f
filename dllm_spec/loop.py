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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from dllm_spec.policy import BlockLengthPolicy
from dllm_spec.stats import GenerationStats
from dllm_spec.timing import CycleClock, wall_clock
from drafters.base import Drafter, DraftProposal, Sequences
from verify.sampling import SamplingParams
from verify.verifier import Verifier


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
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")


@dataclass
class Request:
    """One sequence: ``input_ids`` (T,) long, its own ``generator`` (a row's draws never depend on
    its batch neighbours) and its ``stats``."""

    input_ids: torch.Tensor
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


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
    pending = enumerate(requests)
    reqs: dict[int, Request] = {}
    device = verifier.model.device
    totals = totals if totals is not None else GenerationStats()
    totals.drafter = drafter.name
    policy.prepare(max_batch)
    verifier.reset()
    drafter.reorder([])  # forget the rows of any earlier batch
    ids = torch.zeros((max_batch, 256), dtype=torch.long, device=device)  # committed tokens, position-indexed per row
    lengths: list[int] = []
    rows: list[_Row] = []
    finished: list[int] = []  # rows whose request stopped in the last cycle
    exhausted = False
    start = wall_clock(device)
    clock = CycleClock(device)  # phase timings without extra device synchronisations
    ban = sorted(stop.stop_token_ids) if stop.min_new_tokens else []
    cap = stop.context_limit if max_draft is None else max_draft  # drafts per cycle, whatever the policy asks

    def take() -> tuple[int, Request] | None:
        nonlocal exhausted
        if exhausted:
            return None
        try:
            return next(pending)
        except StopIteration:
            exhausted = True
            return None

    def write(r: int, tokens: torch.Tensor) -> None:
        nonlocal ids
        end = lengths[r] + tokens.numel()
        if end > ids.shape[1]:
            grown = torch.zeros((max_batch, max(end, 2 * ids.shape[1])), dtype=torch.long, device=device)
            grown[:, : ids.shape[1]] = ids
            ids = grown
        ids[r, lengths[r]: end] = tokens
        lengths[r] = end

    try:
        while True:
            # ---- refill the slots of finished rows, then drop the rest, then grow the batch ----
            starting: list[tuple[int, int, Request]] = []  # (row, request index, request)
            free = sorted(finished)
            finished = []
            keep = [r for r in range(len(rows)) if r not in free]
            while free:
                item = take()
                if item is None:
                    break
                starting.append((free.pop(0), *item))
            if free:  # nobody waits for these slots: move the active rows down over them
                index = sorted(keep + [r for r, _, _ in starting])
                remap = {old: new for new, old in enumerate(index)}
                verifier.reorder(index)
                drafter.reorder(index)
                ids[: len(index)] = ids[torch.tensor(index, dtype=torch.long, device=device)]
                lengths = [lengths[i] for i in index]
                rows = [rows[i] for i in index]
                starting = [(remap[r], i, q) for r, i, q in starting]
            appended = 0
            while len(rows) + appended < max_batch:
                item = take()
                if item is None:
                    break
                starting.append((len(rows) + appended, *item))
                appended += 1
            if starting:
                now = wall_clock(device)
                for row, index, request in starting:
                    reqs[index] = request
                    if row == len(rows):
                        rows.append(_Row(index))
                        lengths.append(0)
                    else:
                        rows[row] = _Row(index)
                        lengths[row] = 0
                    rows[row].started = now
                    write(row, request.input_ids.to(device))
                    request.stats.prompt_tokens = int(request.input_ids.numel())
                    request.stats.drafter = drafter.name
                slots = [row for row, _, _ in starting]
                _, features, counts = verifier.prefill([q.input_ids for _, _, q in starting], slots)
                drafter.begin(slots, Sequences(ids, lengths), features, counts)
                done = wall_clock(device)
                for row, _, request in starting:
                    request.stats.prefill_time_s = done - now
            if not rows:
                return

            # ---- one cycle over every active row ----
            b = len(rows)
            seqs = Sequences(ids, lengths)
            budgets = [stop.max_new_tokens - row.generated for row in rows]
            rooms = [stop.context_limit - n for n in lengths]
            limits = [max(0, min(budget, room) - 1) for budget, room in zip(budgets, rooms)]  # drafts each row may accept
            gens = [reqs[row.request].generator for row in rows]
            k = max(0, min(policy.begin_cycle(b), max(rooms) - 1, cap))  # tokens (tree nodes) fed to the target besides the last
            if drafter.tree_width == 1:
                k = min(k, max(limits))  # a chain's length is its depth
            t0 = clock.mark()
            drafted = drafter.propose(seqs, k, sampling, gens) if k > 0 else DraftProposal.empty(b, device)
            drafted = drafted.limit_depth(limits)  # never accept past max_new_tokens or the context
            proposal = drafted.truncate([min(k, v) for v in policy.choose(drafted)])  # what is verified
            t1 = clock.mark()
            banned = [max(0, stop.min_new_tokens - row.generated) for row in rows] if ban else None
            outcome = verifier.verify(seqs.last(), proposal, sampling, gens, banned_ids=ban, banned_until=banned)
            t2 = clock.mark()
            accepted = outcome.num_accepted  # host lists: the device has finished this cycle
            draft_s, verify_s = clock.seconds(t0, t1), clock.seconds(t1, t2)
            paths = [outcome.paths[r, : accepted[r]] for r in range(b)] if proposal.is_tree else None
            policy.observe(drafted, proposal.lengths, accepted, draft_s, verify_s, paths=paths)
            totals.draft_time_s += draft_s
            totals.verify_time_s += verify_s
            totals.draft_forwards += proposal.forwards
            totals.target_forwards += 1
            totals.row_forwards += b
            totals.verified_tokens += sum(proposal.lengths)
            totals.accepted_tokens += sum(accepted)
            predictions = policy.last_predictions
            next_tokens = outcome.next_token.tolist()
            drafts = outcome.tokens.tolist()
            for r, row in enumerate(rows):
                st = reqs[row.request].stats
                st.draft_time_s += draft_s
                st.verify_time_s += verify_s
                st.draft_forwards += proposal.forwards
                st.record_cycle(proposal.lengths[r], accepted[r], None if predictions is None else predictions[r], proposal.row_depth(r))
                new = drafts[r][: accepted[r]] + [next_tokens[r]]
                budget = budgets[r]
                cut = None if stop.ignore_eos else _first_stop(new, stop.stop_token_ids)
                hit_stop = cut is not None and cut < budget
                new = new[: min(budget, cut + 1 if hit_stop else budget)]
                write(r, torch.tensor(new, dtype=torch.long, device=device))
                row.generated += len(new)
                st.new_tokens = row.generated
                totals.new_tokens += len(new)
                reason = "eos" if hit_stop else ("length" if len(new) == budget else None)
                if reason is None and lengths[r] >= stop.context_limit:
                    reason = "context"
                if reason is not None:
                    st.stop_reason = reason
                    st.wall_time_s = wall_clock(device) - row.started
                    finished.append(r)
                yield Emitted(row.request, torch.tensor(new, dtype=torch.long), reason is not None)
            drafter.commit(Sequences(ids, lengths), outcome.features, outcome.feature_counts)
    finally:
        totals.wall_time_s = wall_clock(device) - start
