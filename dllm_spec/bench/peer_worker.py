"""The child-process side of :class:`dllm_spec.bench.peers.PeerProcess` (run by path, so that starting it
imports nothing but the peer's own module).

Protocol, one JSON object per line: the first line on stdin names the peer, ``{"factory":
"module:callable", "kwargs": {...}}``, and the worker answers ``{"ready": true}``; then each line
is a request ``{"ids": [...], "max_new_tokens": n, "ignore_eos": bool}`` answered with ``{"ids":
[new ids], "wall_s": seconds}`` (or ``{"error": "..."}`` for a refused request). Answers go to
the original stdout; anything the peer's native code prints goes to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time


def main() -> None:
    """Build the peer named on the first line, then answer requests until stdin closes."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # native prints (llama.cpp's) must not corrupt the protocol
    first = json.loads(sys.stdin.readline())
    module, _, name = first["factory"].partition(":")
    try:
        peer = getattr(importlib.import_module(module), name)(**first["kwargs"])
    except (ImportError, ValueError, OSError) as exc:  # e.g. llama-cpp-python missing: the parent says so in one line
        _answer(answers, {"error": str(exc)})
        return
    _answer(answers, {"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        try:
            ids = peer.generate_ids(request["ids"], request["max_new_tokens"], request["ignore_eos"])
        except ValueError as exc:
            _answer(answers, {"error": str(exc)})
            continue
        _answer(answers, {"ids": [int(t) for t in ids], "wall_s": time.perf_counter() - start})


def _answer(fh, reply: dict) -> None:
    fh.write(json.dumps(reply) + "\n")
    fh.flush()


if __name__ == "__main__":
    main()
