"""Property-based fuzzing of the store readers (issue 12): random byte flips, truncations and manifest
field edits never end in a traceback (only the project's typed errors), and never pass
``lopd store verify`` when they changed what the store holds.

"What the store holds" is every byte of every shard plus the manifest fields that define or account
for that content: format, store_uuid/store_id, the identity fields, kind, columns, parts,
shard entries and the stats verify can recompute from the rows. Descriptive fields (paths, notes,
created_at, writer_version, extra, lineage, rep_rate, the mean log-ratio, teacher_consistency) carry
no checksum, so editing them is not "changing the content" here; see content_view below. A newer
minor format_version only warns, by the format's versioning rule, so it is not content either.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_common import write_store

from lightning_opd.errors import LopdError
from lightning_opd.store.reader import open_store, read_part
from lightning_opd.store.summary import summarize_store
from lightning_opd.store.verify import verify_store
from storage_schemas import logprob_store_v1 as fmt

# A few seconds by default; LOPD_FUZZ_EXAMPLES=2000 for a long, randomised hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("LOPD_FUZZ_EXAMPLES", 60)),
    deadline=None,
    # The same examples on every default run, so a CI failure reproduces locally.
    derandomize="LOPD_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SHARDS = ["data/part-000000.parquet", "data/part-000001.parquet"]
STATS_CHECKED = ("num_rollouts", "num_response_tokens", "mean_response_length", "max_response_length",
                 "trunc_rate", "num_empty")  # fmt: skip
TOP_LEVEL = ("format", "store_uuid", "store_id", "kind", "num_parts", "columns")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("fuzz") / "store", num_parts=2, topk=2, with_text=True)


@contextlib.contextmanager
def scratch_copy(pristine: Path):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        shutil.copytree(pristine, root)
        yield root


def content_view(manifest: dict) -> dict:
    """The manifest fields that define or account for the store's content (see the module docstring)."""
    typed = fmt.Manifest.from_dict(manifest)
    return {
        **{name: getattr(typed, name) for name in TOP_LEVEL},
        "identity": fmt.identity(typed.header()),
        "shards": sorted((s.part, s.file, s.rows, s.tokens, s.bytes, s.sha256) for s in typed.shards),
        "stats": {name: getattr(typed.stats, name) for name in STATS_CHECKED},
    }


def read_everything(root: Path) -> None:
    """Every reader path a user reaches; a LopdError is an acceptable answer, anything else is a bug."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            store = open_store(root)
            for _ in store.iter_rows():
                pass
        except LopdError:
            pass
        for part in range(2):
            with contextlib.suppress(LopdError):
                read_part(root, part)
        with contextlib.suppress(LopdError):
            summarize_store(root)


def check_verify(root: Path, pristine: Path, *, content_changed: bool | None = None) -> None:
    """verify never raises; when it passes, the content must be what it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify_store(root)
        if not report.ok and content_changed is None:
            return
        if content_changed is None:  # decide from the manifest: did a content-defining field change?
            before = json.loads((pristine / fmt.MANIFEST_FILE).read_text())
            after = json.loads((root / fmt.MANIFEST_FILE).read_text())
            content_changed = content_view(after) != content_view(before)
    assert not (report.ok and content_changed), f"verify passed a changed store:\n{report.format()}"


def flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# Byte flips and truncations
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(target=st.sampled_from(SHARDS), offset=st.integers(0, 10**7), bit=st.integers(0, 7))
def test_shard_byte_flip(pristine, target, offset, bit):
    with scratch_copy(pristine) as root:
        flip(root / target, offset, bit)
        read_everything(root)
        check_verify(root, pristine, content_changed=True)


@FUZZ
@given(offset=st.integers(0, 10**7), bit=st.integers(0, 7))
def test_manifest_byte_flip(pristine, offset, bit):
    with scratch_copy(pristine) as root:
        flip(root / fmt.MANIFEST_FILE, offset, bit)
        read_everything(root)
        check_verify(root, pristine)


@FUZZ
@given(target=st.sampled_from([fmt.MANIFEST_FILE, *SHARDS]), keep=st.floats(0, 1, exclude_max=True))
def test_truncation(pristine, target, keep):
    with scratch_copy(pristine) as root:
        path = root / target
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        read_everything(root)
        # Only the manifest's trailing newline can go without changing what the file says.
        check_verify(root, pristine, content_changed=True if target in SHARDS else None)


# ---------------------------------------------------------------------------------------------
# Manifest field edits
# ---------------------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["k", "file", "rows", "part"]), st.integers(-3, 3), max_size=2),
)


def leaf_paths(value, prefix=()) -> list[tuple]:
    """Every path into a JSON document (dict keys and list indices), containers included."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            paths += leaf_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            paths += leaf_paths(child, (*prefix, i))
    return paths


def apply_edit(document, path, value, delete: bool):
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@FUZZ
@given(data=st.data())
def test_manifest_field_edit(pristine, data):
    original = json.loads((pristine / fmt.MANIFEST_FILE).read_text())
    path = data.draw(st.sampled_from(leaf_paths(original)), label="path")
    delete = data.draw(st.booleans(), label="delete")
    value = data.draw(JSON_VALUES, label="value")
    edited = copy.deepcopy(original)
    apply_edit(edited, path, value, delete)
    with scratch_copy(pristine) as root:
        # allow_nan: NaN/Infinity as Python's json writes them; a strict reader refuses them, ours must too
        (root / fmt.MANIFEST_FILE).write_text(json.dumps(edited, allow_nan=True))
        read_everything(root)
        check_verify(root, pristine)


def test_content_view_sees_the_fields_it_should(pristine):
    """The oracle itself: a content edit changes the view, a descriptive edit does not."""
    original = json.loads((pristine / fmt.MANIFEST_FILE).read_text())
    content = [(("shards", 0, "rows"), 1), (("sampling", "seed"), 99), (("stats", "num_empty"), 0)]
    descriptive = [(("created_at",), "x"), (("student", "path"), "/elsewhere"), (("extra",), {"a": 1})]
    for path, value in content + descriptive:
        edited = copy.deepcopy(original)
        apply_edit(edited, path, value, False)
        assert (content_view(edited) != content_view(original)) == ((path, value) in content), path
    assert not math.isnan(content_view(original)["stats"]["mean_response_length"])
