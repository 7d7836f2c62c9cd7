"""Reads an offline W&B run file (``run-<id>.wandb``) back, so tests can see what arrived.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1 little endian, version),
then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32C: 4 bytes, length: 2 bytes little
endian, type: FULL=1, FIRST=2, MIDDLE=3, LAST=4); a block tail shorter than 7 bytes is padding.
Each assembled payload is one serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7


def run_file(run: Any) -> Path:
    """The transaction log of a W&B run (ask before ``run.finish()``; read it after)."""
    return Path(run.dir).parent / f"run-{run.id}.wandb"


def wait_complete(path: Path, timeout: float = 60.0) -> None:
    """Waits until the file ends with the run's ``exit`` record: ``run.finish()`` can return
    before the W&B service has written the file out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kinds = [record.WhichOneof("record_type") for record in records(path)]
        if kinds and kinds[-1] == "exit":
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path} has no exit record after {timeout} s")


def records(path: Path) -> Iterator[Any]:
    """Every record of the run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes() if path.exists() else b""
    if len(data) < _HEADER:  # not written yet
        return
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"not a W&B run file: {path}")
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0 and length == 0:
            position += left_in_block
            continue
        if position + _HEADER + length > len(data):  # a chunk still being written
            return
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict[str, Any]]:
    """One ``{key: value}`` per history row (one per committed ``run.log``)."""
    wait_complete(path)
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                value = json.loads(item.value_json)
                key, *fields = [item.key] if item.key else item.nested_key
                if fields:  # a logged object (a table...): {field: value} under its key
                    row.setdefault(key, {})["/".join(fields)] = value
                else:
                    row[key] = value
            rows.append(row)
    return rows


def logged_table(path: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a table logged to the run (``reference``: its history value)."""
    return json.loads((path.parent / "files" / reference["path"]).read_text())


def of_type(path: Path, kind: str) -> list[Any]:
    """The payloads of every record of one type (``"metric"``, ``"alert"``...)."""
    wait_complete(path)
    return [getattr(r, kind) for r in records(path) if r.WhichOneof("record_type") == kind]
