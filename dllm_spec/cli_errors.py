"""How every subcommand ends on bad input or an interrupt: one line on stderr, no traceback.

Bad input exits with status 2 (``PROG: error: ...``); Ctrl-C exits with 130 and says the run can be
resumed. Messages that span several lines (some from transformers do) are joined into one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its lines joined), or its type name when it has none."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


@contextlib.contextmanager
def exits_cleanly(prog: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn ``errors`` into ``PROG: error: <one line>`` + exit 2, and Ctrl-C into
    ``PROG: interrupted; rerun to resume`` + exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except errors as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def check_argv(argv: Sequence[str]) -> None:
    """Refuse command-line arguments that are not valid UTF-8 (Python keeps their raw bytes as
    surrogates, which break later in file names, prompts and JSON)."""
    for arg in argv:
        if not isinstance(arg, str):
            continue
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"argument {arg!r} is not valid UTF-8 text (check the terminal's encoding)") from None
