"""Other engines as benchmark peers (never a runtime dependency).

:class:`LlamaCppPeer` decodes the embedded default target's own GGUF file with llama.cpp
(``pip install llama-cpp-python``, a benchmark extra; it builds from source), greedy, from the
same prompt token ids as this library. ``bench --peers llama.cpp`` runs it interleaved with the
other variants. Its greedy output is llama.cpp's (its own kernels and rounding), so the bench
reports whether it matched ours but never requires it.

:class:`PeerProcess` runs a peer in a child process (the bench does): a peer that crashes (a
segfault or an abort in native code) raises :class:`PeerCrashed` naming the signal, and the
bench keeps the other variants' results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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

    def __init__(
        self,
        encode,
        stop_ids: frozenset[int] | list[int],
        gguf_path=None,
        threads: int | None = None,
        n_ctx: int = 4096,
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ValueError(
                "the llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python "
                "(a benchmark extra; it builds llama.cpp from source)"
            ) from None
        if gguf_path is None:
            from dllm_spec.target import DEFAULT_GGUF_FILE, default_gguf_dir

            gguf_path = default_gguf_dir() / DEFAULT_GGUF_FILE
        self.encode = encode
        self.stop_ids = frozenset(stop_ids)
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=threads or torch.get_num_threads(),
            n_batch=512,
            verbose=False,
            logits_all=False,
        )

    def generate(
        self,
        prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
        sampling: str = "reproducible",
    ) -> PeerOutput:
        _check_greedy(self.name, temperature, min_new_tokens)
        ids = self.encode(prompt)[0].tolist()
        t0 = time.perf_counter()
        out = self.generate_ids(ids, max_new_tokens, ignore_eos)
        return _output(self.name, out, time.perf_counter() - t0)

    def generate_ids(self, ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
        """The greedy continuation of the prompt ``ids``: stops after a stop id (emitted) unless
        ``ignore_eos``, or at ``max_new_tokens``."""
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) >= max_new_tokens or (token in self.stop_ids and not ignore_eos):
                break
        return out


def _check_greedy(name: str, temperature: float, min_new_tokens: int) -> None:
    if temperature != 0:
        raise ValueError(f"the {name} peer runs greedy decoding only (temperature 0)")
    if min_new_tokens:  # this library bans stop ids below min_new_tokens; llama.cpp's generate cannot
        raise ValueError(f"the {name} peer has no min_new_tokens; use ignore_eos for long outputs")


def _output(name: str, ids: list[int], wall: float) -> PeerOutput:
    """What the bench reads from a peer's run of ``ids`` new tokens in ``wall`` seconds."""
    stats = GenerationStats(drafter=name)
    stats.new_tokens = len(ids)
    stats.target_forwards = stats.row_forwards = len(ids)
    stats.wall_time_s = wall
    return PeerOutput(torch.tensor([ids], dtype=torch.long), stats)


class PeerCrashed(RuntimeError):
    """A peer's process died: a signal (a segfault, an abort) or an exit."""


class PeerProcess:
    """A peer run in a child process (:mod:`dllm_spec.peer_worker`), so that a crash in its native
    code cannot take the bench down: the child dies, :meth:`generate` raises :class:`PeerCrashed`
    naming the signal, and the caller goes on without it.

    Args:
        name: the peer's label.
        encode: prompt -> token ids (1, T), run here: the child gets the ids.
        factory: ``"module:callable"``, called in the child with ``kwargs`` (JSON values); the object
            it returns has ``generate_ids(ids, max_new_tokens, ignore_eos) -> list[int]``.
    """

    def __init__(self, name: str, encode, factory: str, kwargs: dict) -> None:
        self.name, self.encode = name, encode
        worker = Path(__file__).with_name("peer_worker.py")
        paths = [p or os.getcwd() for p in sys.path]  # the child imports what this process can
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        self.proc = subprocess.Popen(
            [sys.executable, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._call({"factory": factory, "kwargs": kwargs})

    def _call(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise PeerCrashed(f"peer {self.name} crashed ({self._how_it_ended()})")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(f"peer {self.name}: {reply['error']}")
        return reply

    def _how_it_ended(self) -> str:
        code = self.proc.wait()
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def generate(
        self,
        prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
        sampling: str = "reproducible",
    ) -> PeerOutput:
        """As :meth:`LlamaCppPeer.generate`, in the child; raises :class:`PeerCrashed` if it died."""
        _check_greedy(self.name, temperature, min_new_tokens)
        ids = self.encode(prompt)[0].tolist()
        reply = self._call({"ids": ids, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos})
        return _output(self.name, reply["ids"], reply["wall_s"])

    def close(self) -> None:
        """Let the child finish (stdin closed), killing it if it does not within 10 s."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def build_peer(name: str, spec, isolated: bool = False) -> LlamaCppPeer | PeerProcess:
    """A peer by name for the speculator ``spec`` (its encoding and stop ids); ``isolated`` runs it
    in a child process (:class:`PeerProcess`)."""
    if name != "llama.cpp":
        raise ValueError(f"unknown peer {name!r}: use one of {', '.join(PEERS)}")
    if isolated:
        from dllm_spec.target import DEFAULT_GGUF_FILE, default_gguf_dir

        kwargs = dict(
            encode=None,
            stop_ids=sorted(spec._stop_ids(None)),
            threads=torch.get_num_threads(),
            gguf_path=str(default_gguf_dir() / DEFAULT_GGUF_FILE),
        )
        return PeerProcess(name, spec.encode, "dllm_spec.peers:LlamaCppPeer", kwargs)
    return LlamaCppPeer(spec.encode, spec._stop_ids(None), threads=torch.get_num_threads())
