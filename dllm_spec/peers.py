"""Other engines as benchmark peers (never a runtime dependency).

:class:`LlamaCppPeer` decodes the embedded default target's own GGUF file with llama.cpp
(``pip install llama-cpp-python``, a benchmark extra; it builds from source), greedy, from the
same prompt token ids as this library. ``bench --peers llama.cpp`` runs it interleaved with the
other variants. Its greedy output is llama.cpp's (its own kernels and rounding), so the bench
reports whether it matched ours but never requires it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dllm_spec.stats import GenerationStats

PEERS = ("llama.cpp",)


@dataclass
class PeerOutput:
    """What the bench reads from a run: the new token ids (1, n) and the stats."""

    token_ids: torch.Tensor
    stats: GenerationStats = field(default_factory=GenerationStats)


class LlamaCppPeer:
    """Greedy plain decoding of a GGUF file with llama.cpp.

    Args:
        gguf_path: the model file (default: the embedded default target's).
        encode: prompt -> token ids (1, T), e.g. ``DiffusionSpeculator.encode``: both engines get the
            same tokens.
        stop_ids: token ids that end generation (emitted, then stop), as in this library.
        threads: llama.cpp threads (default: torch's).
    """

    name = "llama.cpp"

    def __init__(self, encode, stop_ids: frozenset[int], gguf_path=None, threads: int | None = None, n_ctx: int = 4096) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ValueError("the llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python "
                             "(a benchmark extra; it builds llama.cpp from source)") from None
        if gguf_path is None:
            from dllm_spec.target import DEFAULT_GGUF_FILE, default_gguf_dir

            gguf_path = default_gguf_dir() / DEFAULT_GGUF_FILE
        self.encode = encode
        self.stop_ids = stop_ids
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads or torch.get_num_threads(),
                         n_batch=512, verbose=False, logits_all=False)

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
                 min_new_tokens: int = 0, ignore_eos: bool = False) -> PeerOutput:
        if temperature != 0:
            raise ValueError("the llama.cpp peer runs greedy decoding only (temperature 0)")
        if min_new_tokens:  # this library bans stop ids below min_new_tokens; llama.cpp's generate cannot
            raise ValueError("the llama.cpp peer has no min_new_tokens; use ignore_eos for long outputs")
        ids = self.encode(prompt)[0].tolist()
        self.llm.reset()
        out: list[int] = []
        t0 = time.perf_counter()
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) >= max_new_tokens or (token in self.stop_ids and not ignore_eos):
                break
        wall = time.perf_counter() - t0
        stats = GenerationStats(drafter=self.name)
        stats.new_tokens = len(out)
        stats.target_forwards = stats.row_forwards = len(out)
        stats.wall_time_s = wall
        return PeerOutput(torch.tensor([out], dtype=torch.long), stats)


def build_peer(name: str, spec) -> LlamaCppPeer:
    """A peer by name for the speculator ``spec`` (its encoding and stop ids)."""
    if name != "llama.cpp":
        raise ValueError(f"unknown peer {name!r}: use one of {', '.join(PEERS)}")
    return LlamaCppPeer(spec.encode, spec._stop_ids(None), threads=torch.get_num_threads())
