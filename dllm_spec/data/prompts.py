"""The project's own prompt set: templates x topics, procedurally generated problems, and prompts
built from real text available offline (Python standard-library docstrings, man-page summaries).

Every prompt has a stable id, a category and a split. The split is a hash of the prompt text, so
it never changes when the set grows: ``heldout`` prompts are never used for training and are what
``dllm-spec bench`` measures on. HumanEval is not used here: it is an evaluation set.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import random
import re
import sys
from pathlib import Path

# torch replaces ``inspect.getfile`` (with an undocumented wrapper) when it is imported, which
# drops one docstring and reshuffles the whole set. Every user of the set imports torch (data
# generation, training, the benchmark), so the set is defined with it imported, here too.
import torch  # noqa: F401

from dllm_spec.prompt import Prompt

CATEGORIES = ("reasoning", "code", "explanation", "chat", "docs")


TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "compound interest", "vaccines",
    "plate tectonics", "the water cycle", "machine learning", "blockchain", "climate change",
    "the immune system", "supply and demand", "the Roman Empire", "quantum computing", "DNA replication",
    "electric cars", "the stock market", "volcanoes", "the internet", "renewable energy",
    "sleep", "the human heart", "inflation", "democracy", "gravity", "evolution", "coffee",
    "the Moon landing", "recycling", "solar panels", "antibiotics", "the printing press",
    "ocean tides", "earthquakes", "the Great Wall of China", "honeybees", "rainbows",
    "the Industrial Revolution", "meditation", "time management", "public speaking", "nutrition",
    "exercise", "budgeting", "learning a new language", "remote work", "social media",
    "artificial intelligence ethics", "space exploration", "the periodic table", "magnets",
    "nuclear energy", "batteries", "the speed of light", "prime numbers", "probability",
    "encryption", "operating systems", "databases", "compilers", "computer networks", "GPS",
    "weather forecasting", "tea", "chess", "the Olympic Games", "jazz music", "impressionist painting",
    "Shakespeare", "the Renaissance", "ancient Egypt", "the Silk Road", "coral reefs", "rainforests",
    "deserts", "glaciers", "wind turbines", "3D printing", "robotics", "self-driving cars",
    "cloud computing", "open-source software", "version control", "unit testing", "agile development",
    "cybersecurity", "passwords", "phishing", "the scientific method", "statistics", "entropy",
    "thermodynamics", "sound waves", "the human brain", "memory", "habits", "motivation",
    "friendship", "leadership", "negotiation", "writing a resume", "job interviews", "gardening",
    "composting", "baking bread", "fermentation", "volunteering", "urban planning", "public transport",
    "bicycles", "airplanes", "submarines", "bridges", "skyscrapers", "the metric system", "calendars",
    "money", "taxes", "insurance", "mortgages", "retirement savings", "cryptocurrency",
    "the Pythagorean theorem", "fractions", "algebra", "calculus", "linear regression",
    "sorting algorithms", "recursion", "hash tables", "binary search", "graph algorithms",
]

EXPLAIN_TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "What is {t}? Give a clear explanation with an example.",
    "Write a short essay about {t}.",
    "Give me five interesting facts about {t}.",
    "What are the pros and cons of {t}?",
    "Summarize the key ideas behind {t} in a few paragraphs.",
    "How would you teach {t} to a beginner? Outline a short lesson plan.",
    "List the most common misconceptions about {t} and correct them.",
    "Write a detailed explanation of {t}, with headings and bullet points.",
    "Compare {t} with {u}. How are they similar and how are they different?",
    "Why does {t} matter? Explain step by step.",
    "Write a FAQ with five questions and answers about {t}.",
]

CHAT_TEMPLATES = [
    "Hi! Can you help me understand {t}?",
    "I'm feeling stuck with {t}. Any advice?",
    "Write a friendly email to a colleague about {t}.",
    "Tell me a short story that involves {t}.",
    "Write a poem about {t}.",
    "What should I read to learn about {t}?",
    "Give me a step-by-step plan to get better at {t}.",
    "Can you write a tweet-length summary of {t}?",
    "Pretend you are a tour guide and describe {t}.",
    "Write a dialogue between a student and a teacher about {t}.",
]

CODE_TASKS = [
    "reverse a string", "check whether a number is prime", "compute the factorial of n",
    "compute the n-th Fibonacci number", "merge two sorted lists", "find the maximum in a list",
    "count word frequencies in a text", "remove duplicates from a list while keeping order",
    "check whether a string is a palindrome", "flatten a nested list", "implement binary search",
    "implement bubble sort", "implement quicksort", "implement merge sort", "parse a CSV line",
    "convert Celsius to Fahrenheit", "compute the greatest common divisor", "validate an email address",
    "read a file and count its lines", "find the longest common prefix of strings",
    "rotate a matrix by 90 degrees", "implement a stack class", "implement a queue with two stacks",
    "implement a linked list", "compute the sum of digits of a number", "check balanced parentheses",
    "convert a Roman numeral to an integer", "convert an integer to binary", "find all anagrams in a list",
    "compute the moving average of a list", "implement an LRU cache", "transpose a matrix",
    "generate all permutations of a list", "generate all subsets of a set", "find the two numbers that sum to a target",
    "compute the median of a list", "capitalize every word in a sentence", "count vowels in a string",
    "implement a simple calculator", "find the second largest number in a list",
    "merge two dictionaries", "sort a list of dictionaries by a key", "chunk a list into pieces of size n",
    "compute the dot product of two vectors", "check whether two strings are anagrams",
    "find the first non-repeating character", "implement depth-first search on a graph",
    "implement breadth-first search on a graph", "compute Pascal's triangle", "simulate a bank account class",
]
CODE_LANGS = ["Python", "Python", "Python", "JavaScript", "C", "Java", "Rust", "Go", "SQL", "Bash"]
CODE_TEMPLATES = [
    "Write a {lang} function to {task}.",
    "Write a {lang} function to {task}. Explain how it works.",
    "Write a {lang} program to {task}, with comments.",
    "How do I {task} in {lang}? Show the code and its time complexity.",
    "Write a {lang} function to {task} and a few tests for it.",
]

REASONING_TEMPLATES = [
    "A shop sells pencils at {a} cents each and pens at {b} cents each. Sam buys {c} pencils and {d} pens. How much does he pay in total? Think step by step.",
    "A train travels {a} km in {c} hours. What is its average speed? Then, how far does it go in {d} hours at that speed? Explain your reasoning.",
    "Maria has {a} apples. She gives {c} to each of her {d} friends. How many apples does she have left? Show your work.",
    "What is {a} multiplied by {b}? Work it out step by step.",
    "Solve for x: {c}x + {a} = {b}. Show each step.",
    "A rectangle is {a} cm long and {c} cm wide. What are its area and perimeter? Explain.",
    "If a number is increased by {c} percent and becomes {b}, what was the original number? Reason carefully.",
    "There are {a} students in a school. {c} percent of them play football. How many students play football? Explain step by step.",
    "John is {c} years older than Mary. In {d} years, the sum of their ages will be {b}. How old is Mary now? Think step by step.",
    "A recipe needs {c} eggs for {d} people. How many eggs are needed for {a} people? Show your reasoning.",
    "What is the sum of all integers from 1 to {a}? Explain the method you use.",
    "A car uses {c} liters of fuel per 100 km. How much fuel is needed for {a} km? Explain.",
    "Is {a} a prime number? Check step by step.",
    "Convert {a} minutes into hours and minutes. Explain.",
    "A bag has {c} red balls and {d} blue balls. What is the probability of drawing a red ball? Explain your reasoning.",
    "Three friends share a bill of {b} dollars. One pays {c} dollars more than each of the other two, who pay equally. How much does each pay? Think step by step.",
]
LOGIC_PROMPTS = [
    "If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies? Explain.",
    "A farmer has to cross a river with a wolf, a goat and a cabbage. How does he do it? Explain each step.",
    "You have two ropes that each take one hour to burn. How can you measure 45 minutes? Explain.",
    "Which is heavier: a kilogram of feathers or a kilogram of steel? Explain your reasoning.",
    "If it takes 5 machines 5 minutes to make 5 widgets, how long does it take 100 machines to make 100 widgets? Think step by step.",
    "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does the ball cost? Reason carefully.",
    "There are three boxes, one with apples, one with oranges and one with both. All labels are wrong. How can you label them correctly by picking one fruit? Explain.",
    "What comes next in the sequence 2, 4, 8, 16, ...? Explain the pattern.",
    "What comes next in the sequence 1, 1, 2, 3, 5, 8, ...? Explain the pattern.",
    "If today is Wednesday, what day will it be in 100 days? Show your reasoning.",
]

DOC_TEMPLATES = [
    "Here is the documentation of the Python function `{name}`:\n\n{doc}\n\nExplain what it does and give an example of how to use it.",
    "Write unit tests for the Python function `{name}`, documented as follows:\n\n{doc}",
    "Summarize this documentation of `{name}` in plain language:\n\n{doc}",
    "Document the Python function `{name}` with a clear docstring and usage notes. Its current documentation is:\n\n{doc}",
]
MAN_TEMPLATES = [
    "Explain how to use the `{cmd}` command ({desc}), with examples.",
    "What does the Unix command `{cmd}` do? ({desc}) Give common options and examples.",
    "Write a short tutorial on `{cmd}`: {desc}.",
]

STDLIB_MODULES = [
    "os", "os.path", "sys", "re", "json", "math", "random", "statistics", "itertools", "functools",
    "collections", "string", "textwrap", "datetime", "time", "calendar", "shutil", "glob", "fnmatch",
    "pathlib", "subprocess", "threading", "queue", "heapq", "bisect", "array", "copy", "pprint",
    "enum", "decimal", "fractions", "hashlib", "hmac", "base64", "binascii", "struct", "zlib", "gzip",
    "bz2", "lzma", "zipfile", "tarfile", "csv", "configparser", "tempfile", "io", "operator", "inspect",
    "urllib.parse", "html", "difflib", "unicodedata", "secrets", "uuid", "socket", "select", "signal",
    "logging", "argparse", "shlex", "platform", "locale", "gettext", "codecs", "dataclasses", "typing",
    "contextlib", "abc", "weakref", "types", "traceback", "warnings", "timeit", "doctest", "unittest",
    "email.utils", "mimetypes", "ipaddress", "sqlite3", "xml.etree.ElementTree", "colorsys", "cmath",
]


def _clean_doc(doc: str, limit: int = 700) -> str:
    doc = inspect.cleandoc(doc).strip()
    return doc if len(doc) <= limit else doc[:limit].rsplit(" ", 1)[0] + " ..."


# More standard-library modules for the second part of the set (not the ones with side effects on
# import, platform-only ones, or packaging internals).
EXTRA_STDLIB_MODULES = [
    "builtins", "ast", "asyncio", "atexit", "bdb", "cProfile", "cmd", "code", "codeop", "compileall",
    "concurrent.futures", "contextvars", "copyreg", "ctypes", "dbm", "dis", "email", "email.message",
    "email.parser", "errno", "faulthandler", "filecmp", "fileinput", "ftplib", "gc", "getopt",
    "getpass", "graphlib", "http.client", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.resources", "keyword", "linecache", "mailbox", "marshal", "mmap", "modulefinder",
    "multiprocessing", "netrc", "numbers", "opcode", "optparse", "pdb", "pickle", "pickletools",
    "pkgutil", "plistlib", "poplib", "posixpath", "profile", "pstats", "pty", "pyclbr", "pydoc",
    "quopri", "reprlib", "resource", "rlcompleter", "runpy", "sched", "selectors", "shelve", "site",
    "smtplib", "socketserver", "ssl", "stat", "stringprep", "symtable", "sysconfig", "tabnanny",
    "token", "tokenize", "tomllib", "trace", "tracemalloc", "tty", "urllib.request", "urllib.error",
    "urllib.robotparser", "venv", "wave", "wsgiref.util", "xml.dom.minidom", "xml.sax", "xmlrpc.client",
    "zipapp", "zipimport", "zoneinfo",
]


def _documented(obj: object) -> str | None:
    doc = inspect.getdoc(obj)
    return _clean_doc(doc) if doc and len(doc) > 60 else None


def _from_stdlib(obj: object) -> bool:
    """False for objects defined outside the standard library (a library's patch or addition:
    transformers adds ``logging.Logger.warning_once``), so the set does not depend on what else
    the process imported."""
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.split(".")[0] in sys.stdlib_module_names


def _documentable(obj: object) -> bool:
    return (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)) and _from_stdlib(obj)


def stdlib_docs(modules: list[str] | None = None, methods: bool = False) -> list[tuple[str, str]]:
    """(qualified name, docstring) for public functions and classes of ``modules`` (default:
    :data:`STDLIB_MODULES`); with ``methods``, for the public methods of those classes instead."""
    out: list[tuple[str, str]] = []
    for module_name in STDLIB_MODULES if modules is None else modules:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module missing on this platform is simply skipped
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_"):
                continue
            if not _documentable(obj):  # or replaced by a library: then the saved original of a hook
                obj = vars(module).get(f"__{name}__")  # (pytest's sys.unraisablehook), else skipped
                if not _documentable(obj):  # (torch's inspect.getfile)
                    continue
            if not methods:
                if doc := _documented(obj):
                    out.append((f"{module_name}.{name}", doc))
                continue
            if not inspect.isclass(obj) or getattr(obj, "__module__", None) != module.__name__:
                continue  # only classes defined here, so that re-exports are not documented twice
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)) and _from_stdlib(member):
                    if doc := _documented(member):
                        out.append((f"{module_name}.{name}.{attr}", doc))
    return out


def man_summaries(limit: int = 3000) -> list[tuple[str, str]]:
    """(command, one-line description) from the NAME section of installed section-1 man pages."""
    root = Path("/usr/share/man/man1")
    if not root.is_dir():
        return []
    out: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.1*.gz")):
        try:
            with gzip.open(path, "rt", errors="ignore") as fh:
                head = fh.read(4000)
        except OSError:
            continue
        match = re.search(r"\.SH\s+\"?NAME\"?\s*\n(.+?)\n\.", head, re.S)
        if not match:
            continue
        line = re.sub(r"\\f[BIRP]|\\-|\\&|\\\(..|\\", " ", match.group(1).replace("\n", " "))
        parts = re.split(r"\s+-+\s+", line, maxsplit=1)
        if len(parts) != 2:
            continue
        cmd, desc = parts[0].split(",")[0].strip(), " ".join(parts[1].split())
        if cmd and 10 < len(desc) < 120 and re.fullmatch(r"[\w.+-]+", cmd):
            out.append((cmd, desc))
        if len(out) >= limit:
            break
    return out


def _stable_id(category: str, text: str) -> str:
    return f"{category}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def build_prompts(seed: int = 0, max_docs: int = 4000, max_man: int = 2500, extended: bool = True) -> list[Prompt]:
    """Build the full prompt set (deterministic for a given seed and machine), shuffled so that any
    prefix mixes all categories.

    The set has two parts, each shuffled on its own: the original one, then (``extended``) the
    documentation of :data:`EXTRA_STDLIB_MODULES` and of the public methods of the classes of both
    module lists. Appending keeps the original part's order, so the benchmark's held-out prompts
    (the first of each category, :func:`heldout_prompts`) stay the same as the set grows.
    """
    prompts = _base_prompts(seed, max_docs, max_man)
    if extended:
        seen = {p.text for p in prompts}
        docs = stdlib_docs(EXTRA_STDLIB_MODULES) + stdlib_docs(STDLIB_MODULES + EXTRA_STDLIB_MODULES, methods=True)
        texts = [("docs", DOC_TEMPLATES[j % len(DOC_TEMPLATES)].format(name=name, doc=doc)) for j, (name, doc) in enumerate(docs)]
        extra = _unique(texts, seen)
        random.Random(seed + 1).shuffle(extra)
        prompts += extra
    return prompts


def _unique(texts: list[tuple[str, str]], seen: set[str]) -> list[Prompt]:
    prompts = []
    for category, text in texts:
        if text not in seen:
            seen.add(text)
            prompts.append(Prompt(_stable_id(category, text), category, text))
    return prompts


def _base_prompts(seed: int, max_docs: int, max_man: int) -> list[Prompt]:
    rng = random.Random(seed)
    texts: list[tuple[str, str]] = []
    for i, topic in enumerate(TOPICS):
        other = TOPICS[(i * 7 + 3) % len(TOPICS)]
        texts += [("explanation", t.format(t=topic, u=other)) for t in EXPLAIN_TEMPLATES]
        texts += [("chat", t.format(t=topic)) for t in CHAT_TEMPLATES]
    for task in CODE_TASKS:
        for lang in sorted(set(CODE_LANGS)):
            for template in CODE_TEMPLATES:
                texts.append(("code", template.format(lang=lang, task=task)))
    for template in REASONING_TEMPLATES:
        for _ in range(60):
            a, b = rng.randint(12, 480), rng.randint(20, 900)
            c, d = rng.randint(2, 25), rng.randint(2, 12)
            texts.append(("reasoning", template.format(a=a, b=b, c=c, d=d)))
    texts += [("reasoning", p) for p in LOGIC_PROMPTS]
    docs = stdlib_docs()
    rng.shuffle(docs)
    for j, (name, doc) in enumerate(docs[:max_docs]):
        texts.append(("docs", DOC_TEMPLATES[j % len(DOC_TEMPLATES)].format(name=name, doc=doc)))
    for j, (cmd, desc) in enumerate(man_summaries(max_man)):
        texts.append(("docs", MAN_TEMPLATES[j % len(MAN_TEMPLATES)].format(cmd=cmd, desc=desc)))
    prompts = _unique(texts, set())
    rng.shuffle(prompts)
    return prompts


SUBJECT = re.compile(r"`([^`]+)`")
HELDOUT_SUBJECTS_FILE = Path(__file__).with_name("heldout_subjects.txt")


def prompt_subject(prompt: Prompt | str) -> str | None:
    """The documented subject of a "docs" prompt (`os.path.join`, `tar`): its first backticked
    name. Other prompts (and plain text without one) have none."""
    if isinstance(prompt, Prompt) and prompt.category != "docs":
        return None
    match = SUBJECT.search(prompt.text if isinstance(prompt, Prompt) else prompt)
    return match.group(1) if match else None


def heldout_subjects(prompts: list[Prompt] | None = None, listed: str | Path | None = HELDOUT_SUBJECTS_FILE) -> set[str]:
    """Subjects that no training prompt may document: those of the held-out prompts of ``prompts``
    (default: this machine's set) and those ``listed`` (one per line; the reference machine's).

    The "docs" prompts hold the text of the local standard library, so another Python builds
    other texts, and other held-out hashes, for the same function: a GPU box could train on a
    function whose prompt is held out (or benchmarked) here. The committed list (written by
    ``scripts/filter_distill_data.py --update-subjects``) carries the reference split everywhere.
    """
    prompts = build_prompts() if prompts is None else prompts
    subjects = {s for p in prompts if p.split == "heldout" and (s := prompt_subject(p))}
    if listed is not None and Path(listed).is_file():
        subjects |= {line.strip() for line in Path(listed).read_text().splitlines() if line.strip()}
    return subjects


def training_prompts(seed: int = 0) -> list[Prompt]:
    """The prompts data may be generated for: the train split, minus every prompt that documents a
    held-out subject (:func:`heldout_subjects`)."""
    prompts = build_prompts(seed)
    held = heldout_subjects(prompts)
    return [p for p in prompts if p.split == "train" and prompt_subject(p) not in held]


def heldout_prompts(per_category: int = 4, seed: int = 0) -> list[Prompt]:
    """A small, category-balanced slice of the held-out split, for benchmarks."""
    chosen: dict[str, list[Prompt]] = {c: [] for c in CATEGORIES}
    for prompt in build_prompts(seed):
        if prompt.split == "heldout" and len(chosen[prompt.category]) < per_category:
            chosen[prompt.category].append(prompt)
    return [p for c in CATEGORIES for p in chosen[c]]
