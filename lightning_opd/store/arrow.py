"""Arrow conversion of store rows, both ways: Python/numpy rows -> a table of the store's explicit
schema (refusing ragged input and int32 offset overflow), and record batches -> rows with numpy
arrays (top-k as ``[positions, k]``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from lightning_opd.errors import StoreError

_MAX_LIST_ELEMENTS = 2**31 - 1  # int32 list offsets


def _numpy_values(value: Any, dtype: np.dtype, *, column: str, prompt_id: Any, ndim: int) -> np.ndarray:
    """One row's list value as a numpy array of ``dtype``, refusing ragged input and int32 overflow."""
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise StoreError(f"{column} of prompt_id={prompt_id!r} is ragged: {e}") from None
    if array.size == 0:
        return np.zeros((0,) * ndim, dtype=dtype)  # callers give empty top-k rows their (0, k) shape
    if array.ndim != ndim or array.dtype == object:
        raise StoreError(
            f"{column} of prompt_id={prompt_id!r} must be a {ndim}-d numeric array, got shape {array.shape}"
        )
    if np.issubdtype(dtype, np.integer):
        if not np.issubdtype(array.dtype, np.integer):
            raise StoreError(f"{column} of prompt_id={prompt_id!r} must hold integers, got {array.dtype}")
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise StoreError(
                f"{column} of prompt_id={prompt_id!r} holds values outside the {np.dtype(dtype).name} range"
            )
    return array.astype(dtype, copy=False)


def _list_array(values: list[Any], field: pa.Field, prompt_ids: list[Any]) -> pa.Array:
    """list<prim> column from per-row sequences (None -> null), built with one concatenate."""
    dtype = field.type.value_type.to_pandas_dtype()
    arrays = []
    mask = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        if value is None:
            mask[i] = True
            arrays.append(np.zeros(0, dtype=dtype))
        else:
            arrays.append(_numpy_values(value, dtype, column=field.name, prompt_id=prompt_ids[i], ndim=1))
    return _from_parts(arrays, mask, field.type, field.name)


def _nested_list_array(values: list[Any], field: pa.Field, k: int, prompt_ids: list[Any]) -> pa.Array:
    """list<list<prim>> top-k column from per-row [positions, k] arrays (None -> null)."""
    dtype = field.type.value_type.value_type.to_pandas_dtype()
    arrays = []
    mask = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        if value is None:
            mask[i] = True
            arrays.append(np.zeros((0, k), dtype=dtype))
            continue
        array = _numpy_values(value, dtype, column=field.name, prompt_id=prompt_ids[i], ndim=2)
        if array.size == 0:
            array = np.zeros((0, k), dtype=dtype)
        if array.shape[1] != k:
            raise StoreError(
                f"{field.name} of prompt_id={prompt_ids[i]!r} must have k={k} entries per position, got {array.shape[1]}"
            )
        arrays.append(array)
    positions = [len(a) for a in arrays]
    inner_type = field.type.value_type
    total = sum(positions)
    if total * k > _MAX_LIST_ELEMENTS:
        raise StoreError(
            f"{field.name}: a part of {total * k} values is too large; split the prompt set into more parts"
        )
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype=dtype)
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(0, total * k + 1, k, dtype=np.int32)), pa.array(flat), type=inner_type
    )
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(positions, out=offsets[1:])
    return pa.ListArray.from_arrays(
        pa.array(offsets), inner, type=field.type, mask=pa.array(mask) if mask.any() else None
    )


def _from_parts(arrays: list[np.ndarray], mask: np.ndarray, list_type: pa.DataType, name: str) -> pa.Array:
    lengths = [len(a) for a in arrays]
    total = sum(lengths)
    if total > _MAX_LIST_ELEMENTS:
        raise StoreError(
            f"{name}: a part of {total} values is too large; split the prompt set into more parts"
        )
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=list_type.value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat), type=list_type, mask=pa.array(mask) if mask.any() else None
    )


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema, topk: int | None) -> pa.Table:
    """Build a table of exactly ``schema`` from row dicts (lists or numpy arrays as list values)."""
    names = set(schema.names)
    nullable = {f.name for f in schema if f.nullable}
    prompt_ids = []
    for row in rows:
        if not isinstance(row, dict):
            raise StoreError(f"rows must be dicts, got {type(row).__name__}")
        pid = row.get("prompt_id")
        # A None for a column this store does not keep carries nothing; anything else would be lost.
        unknown = sorted(key for key, value in row.items() if key not in names and value is not None)
        if unknown:
            raise StoreError(
                f"row prompt_id={pid!r} has columns {unknown} that this store does not keep; open the "
                "writer with the matching options (topk / with_reward / with_text / with_sampling) or drop them"
            )
        missing = sorted(n for n in names - set(row) if n not in nullable)
        if missing:
            raise StoreError(f"row prompt_id={pid!r} lacks required columns {missing}")
        prompt_ids.append(pid)
    columns = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if pa.types.is_list(f.type) and pa.types.is_list(f.type.value_type):
            columns.append(_nested_list_array(values, f, topk or 0, prompt_ids))
        elif pa.types.is_list(f.type):
            columns.append(_list_array(values, f, prompt_ids))
        else:
            try:
                columns.append(pa.array(values, type=f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise StoreError(f"column {f.name}: {e}") from None
    return pa.Table.from_arrays(columns, schema=schema)


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A caller's table as exactly ``schema`` (column order, types), or a StoreError saying why not."""
    have, want = set(table.schema.names), set(schema.names)
    if have != want:
        raise StoreError(
            f"table columns differ from the store schema: missing {sorted(want - have)}, unexpected {sorted(have - want)}"
        )
    table = table.select(schema.names)
    if table.schema.equals(schema, check_metadata=False):
        return table
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, NotImplementedError) as e:
        raise StoreError(f"table does not fit the store schema: {e}") from None


def _list_rows(array: pa.ListArray) -> list[np.ndarray | None]:
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]].copy() if valid[i] else None for i in range(len(array))]


def _nested_rows(array: pa.ListArray, k: int | None) -> list[np.ndarray | None]:
    outer = array.offsets.to_numpy()
    inner = array.values
    inner_offsets = inner.offsets.to_numpy()
    leaves = inner.values.to_numpy(zero_copy_only=False)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    rows: list[np.ndarray | None] = []
    for i in range(len(array)):
        if not valid[i]:
            rows.append(None)
            continue
        start, end = inner_offsets[outer[i]], inner_offsets[outer[i + 1]]
        positions = outer[i + 1] - outer[i]
        width = k if k is not None else ((end - start) // positions if positions else 0)
        rows.append(leaves[start:end].reshape(positions, width).copy())
    return rows


def batch_to_rows(batch: pa.RecordBatch, *, topk: int | None = None) -> list[dict[str, Any]]:
    """Rows of a record batch: list columns as numpy copies, top-k as [positions, k], the rest as Python."""
    columns: dict[str, list[Any]] = {}
    for name, array in zip(batch.schema.names, batch.columns):
        if pa.types.is_list(array.type) and pa.types.is_list(array.type.value_type):
            columns[name] = _nested_rows(array, topk)
        elif pa.types.is_list(array.type):
            columns[name] = _list_rows(array)
        else:
            columns[name] = array.to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(batch.num_rows)]
