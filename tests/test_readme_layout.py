"""The README's Layout lists every module, folder and script on disk (and nothing that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_every_module_and_script_is_in_the_layout():
    layout = _layout()
    names = set(re.findall(r"[\w.\-]+", layout))
    wanted = [
        p
        for folder in ("dllm_spec", "drafters", "verify")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py" or p.parent.name in ("drafters",)
    ]
    wanted += [p for p in (ROOT / "scripts").iterdir() if p.is_file()]
    missing = sorted(str(p.relative_to(ROOT)) for p in wanted if p.name not in names)
    assert not missing, f"not in the README Layout: {missing}"
    folders = [
        p.name for folder in ("dllm_spec",) for p in (ROOT / folder).iterdir() if p.is_dir() and p.name != "__pycache__"
    ]
    assert all(f + "/" in layout for f in folders), folders


def test_the_layout_names_no_file_that_is_gone():
    on_disk = {p.name for p in ROOT.rglob("*") if ".git" not in p.parts}
    listed = set(re.findall(r"[\w\-]+\.(?:py|sh|jsonl|txt)\b", _layout()))
    assert listed <= on_disk, sorted(listed - on_disk)
