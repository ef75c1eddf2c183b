"""docs/writing-a-method.md stays true: its example method file registers and runs on the tiny
model with the NFE its card states (the page's own tiny-model test, executed as written), and its
quotes of SDEdit are SDEdit's code."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from editeval.core import registry

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-a-method.md"
SDEDIT = ROOT / "src" / "editeval" / "methods" / "training_free" / "sdedit.py"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def _block(first_line: str) -> str:
    """The page's python block whose first line is ``first_line``."""
    found = [b for b in _blocks("python") if b.splitlines()[0] == first_line]
    assert len(found) == 1, f"docs/writing-a-method.md has no single block starting {first_line!r}"
    return found[0]


@pytest.fixture
def example_method(tmp_path, monkeypatch):
    """The page's ``my_editing/ddim_edit.py``, imported (which registers ``ddim-edit``) from a
    temporary folder; unregistered afterwards."""
    package = tmp_path / "my_editing"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ddim_edit.py").write_text(_block("# my_editing/ddim_edit.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load_plugins()  # the built-in methods first, as a first lookup would
    monkeypatch.delitem(registry._REGISTRY, "ddim-edit", raising=False)
    module = importlib.import_module("my_editing.ddim_edit")
    yield module
    registry._REGISTRY.pop("ddim-edit", None)
    for name in ("my_editing.ddim_edit", "my_editing"):
        sys.modules.pop(name, None)


def test_the_example_method_and_its_tiny_test_run_as_written(example_method):
    assert registry.get_method("ddim-edit").card is example_method.CARD
    namespace: dict = {}
    exec(compile(_block("# tests/test_ddim_edit.py"), "tests/test_ddim_edit.py", "exec"), namespace)
    namespace["test_ddim_edit_nfe_follows_its_card"]()  # the toy-model test needs ~15 s more


def test_the_sdedit_quotes_are_sdedit():
    source = {line.strip() for line in SDEDIT.read_text().splitlines()}
    quoted = [b for b in _blocks("python") if "sdedit" in b.lower() and "my_editing" not in b]
    assert len(quoted) == 3
    for block in quoted:
        for line in block.splitlines():
            if line.strip() and line.strip() != "...":
                assert line.strip() in source, f"not in sdedit.py: {line!r}"
