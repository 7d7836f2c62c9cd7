"""``docs/api.md`` is generated from the docstrings and kept up to date."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning")  # the page documents the Lightning callback
pytest.importorskip("transformers")  # and the Trainer callback

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "api_docs.py"


def test_the_api_reference_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    api_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api_docs)
    expected = api_docs.generate()
    assert (ROOT / "docs" / "api.md").read_text() == expected, (
        "docs/api.md is stale: run python scripts/api_docs.py"
    )
    for _, names in api_docs.SECTIONS:
        for name in names:
            assert (
                f"`{name.replace('gradwatch.', 'gw.', 1)}`" in expected or f"`{name}`" in expected
            )


def test_every_public_name_is_documented() -> None:
    import gradwatch

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [
        name for name in gradwatch.__all__ if name != "__version__" and f"`gw.{name}`" not in text
    ]
    assert not missing


def test_check_mode_accepts_the_committed_page() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
