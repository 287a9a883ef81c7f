"""Benchmarks: the one experiment runner and the experiments it runs.

:mod:`~dllm_spec.bench.runner` owns what every experiment shares: building a variant
(``drafter@policy``) over one target, the prompt sets, the interleaved schedule (every variant
run on the same prompt back to back, the order rotated every repeat, so machine drift hits them
all alike), wall-clock timing, the description of the machine a result was measured on, and the
result file (checked before any work, written atomically). Each experiment is a description of
its variants and its tables:

- :mod:`~dllm_spec.bench.speed`: ``dllm-spec bench``, plain AR vs each drafter at batch 1;
- :mod:`~dllm_spec.bench.throughput`: ``dllm-spec bench --batch-sizes``, tokens/s over batch
  sizes against transformers' batched ``generate``;
- :mod:`~dllm_spec.bench.study`: ``dllm-spec study``, speedup on long outputs (CSV, markdown, plots);
- :mod:`~dllm_spec.bench.peers` and :mod:`~dllm_spec.bench.peer_worker`: other engines
  (llama.cpp) as peers, each in its own process; :mod:`~dllm_spec.bench.vllm_worker`: vLLM's
  side, run by the Python of vLLM's own venv (it imports nothing from this package).

This file imports nothing: the peer worker process imports :mod:`~dllm_spec.bench.peers` alone.
"""
