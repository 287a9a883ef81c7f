"""The wheel puts one name on sys.path: ``dllm_spec`` (the repository's ``drafters/`` and ``verify/``
folders install as ``dllm_spec.drafters`` and ``dllm_spec.verify``, so PyPI's ``drafters`` and
``verify`` distributions can live beside it), and it carries the shipped drafters' weights."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_has_one_top_level_name(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("dllm_spec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"dllm_spec"}, tops
    assert "dllm_spec/drafters/base.py" in names and "dllm_spec/verify/verifier.py" in names
    assert any(n.startswith("dllm_spec/drafters/assets/") and n.endswith(".safetensors") for n in names)
