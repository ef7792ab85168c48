"""docs/memory.md, "On its own: your own records": the example runs literally, with no engine code, and the error
it quotes is the one the memory raises."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from cl.errors import ConfigError
from tests.helpers import doc_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "memory.md"
SECTION = "On its own"


def test_the_standalone_example_runs_and_stores_filters_and_reloads_its_own_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = doc_blocks(DOC, "python", SECTION)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), scope)
    lines = out.getvalue().splitlines()
    mem = scope["mem"]
    assert mem.counts() == {"prototype": 1, "note": 3} and mem.fields == {"source": "str", "page": "int"}
    first = lines[0].split()
    assert first[:2] == ["0", "1.0"] and first[2:] == ["1", "en"]  # query 0 finds its own note first
    assert len([line for line in lines[:2] if line.split()[2] in ("1", "2")]) == 2  # wiki notes only
    assert mem.get([0]).metadata[0]["source"] == "book"  # the update survived the save
    assert (tmp_path / "notes-memory" / "CURRENT").is_file()

    (quoted,) = doc_blocks(DOC, "text", SECTION)
    with pytest.raises(ConfigError) as err:
        mem.search(scope["vectors"][:1], k=1, kind="note", src="wiki")
    assert str(err.value) == quoted.strip()
