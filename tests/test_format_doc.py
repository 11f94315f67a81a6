"""docs/STORE_FORMAT.md is generated from storage_schemas: the committed file must equal a fresh render."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from storage_schemas import logprob_store_v1 as fmt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_format_doc.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_format_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_document_is_current(gen):
    committed = gen.DOC_PATH.read_text() if gen.DOC_PATH.is_file() else ""
    assert committed == gen.render(), (
        f"{gen.DOC_PATH.relative_to(ROOT)} is out of date with storage_schemas; regenerate it: {gen.REGENERATE}"
    )


def test_document_covers_the_format(gen):
    text = gen.render()
    schema = fmt.store_schema(fmt.KIND_SCORED, topk=1, with_reward=True, with_text=True)
    missing = [name for name in schema.names if f"| `{name}` |" not in text]
    missing += [name for name in fmt.IDENTITY_FIELDS if f"- `{name}`" not in text]
    assert not missing, missing
    assert (
        f"format {fmt.FORMAT_VERSION}" in text
        and "StoreVersionError" in text
        and "lopd store convert" in text
    )
    # Every row of a Markdown table has as many (unescaped) cell separators as its header row.
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line.count("|") - line.count("\\|"))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 4 and all(len(set(t)) == 1 for t in tables), tables


def test_check_mode_fails_on_drift_and_says_how_to_fix(tmp_path):
    doc = tmp_path / "STORE_FORMAT.md"
    command = [sys.executable, str(SCRIPT), "--path", str(doc)]
    stale = subprocess.run([*command, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "scripts/gen_format_doc.py" in stale.stderr
    subprocess.run(command, check=True, capture_output=True)
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 0
    doc.write_text(doc.read_text().replace("zstd", "snappy"))
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 1
