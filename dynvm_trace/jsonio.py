"""JSON encoding for event logs: orjson when installed, the standard library otherwise."""

from __future__ import annotations

from typing import Any

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads = orjson.loads
    JSONDecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # Debian 12 has no python3-orjson package
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads
    JSONDecodeError = json.JSONDecodeError


def dumps_lines(records: list[dict[str, Any]]) -> bytes:
    """JSON Lines for a batch of records, each line ending in a newline.

    One dumps() of the whole list costs a small fraction of one call per record (measured in
    docs/performance.md). The list's records are separated by exactly one `},{` each; if the
    count of `},{` is exactly one less than the records, no string holds one, and every
    occurrence is a boundary. Otherwise (a string that contains `},{`) it encodes record by
    record.
    """
    if not records:
        return b""
    data = dumps(records)
    if data.count(b"},{") == len(records) - 1:
        return data[1:-1].replace(b"},{", b"}\n{") + b"\n"
    return b"".join(dumps(r) + b"\n" for r in records)
