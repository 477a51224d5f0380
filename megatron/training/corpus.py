"""Reading raw documents for the data tools: a JSONL file (one document per line) or a folder of text
files (one document per file), always in a deterministic order.

Both kinds are decoded as UTF-8 the same way: by default a byte sequence that is not UTF-8 is an error
naming the file and line (``encoding_errors="strict"``); ``"replace"`` substitutes U+FFFD in both. An
input with no document at all is an error too.
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Iterator


def list_files(folder: str, pattern: str = "*", recursive: bool = True) -> list[str]:
    """Files under ``folder`` whose name matches ``pattern``, sorted by path."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if fnmatch.fnmatch(name, pattern):
                out.append(os.path.join(root, name))
        if not recursive:
            break
    return sorted(out)


ENCODING_ERRORS = ("strict", "replace")


def _decode(raw: bytes, path: str, first_line: int, errors: str) -> str:
    """``raw`` as UTF-8; with ``errors="strict"`` a bad byte is a ValueError naming file:line and the fix."""
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        line = first_line + raw[:exc.start].count(b"\n")
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {col}); convert "
                         "the file to UTF-8, or pass --encoding-errors replace to substitute U+FFFD") from None


def iter_documents(path: str, json_key: str = "text", pattern: str = "*", recursive: bool = True,
                   encoding_errors: str = "strict") -> Iterator[str]:
    """Yield the text of every document of ``path`` (a ``.jsonl``/``.json`` file or a folder)."""
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
    found = False
    for doc in _documents(path, json_key, pattern, recursive, encoding_errors):
        found = True
        yield doc
    if not found:
        raise ValueError(f"{path}: the corpus is empty (no document in it)")


def _documents(path: str, json_key: str, pattern: str, recursive: bool, errors: str) -> Iterator[str]:
    if os.path.isdir(path):
        files = list_files(path, pattern, recursive)
        if not files:
            raise FileNotFoundError(f"{path}: no files match {pattern!r}")
        for f in files:
            with open(f, "rb") as fh:
                yield _decode(fh.read(), f, 1, errors)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (give a JSONL file or a folder of text files)")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, lineno, errors)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if json_key not in record:
                raise ValueError(f"{path}:{lineno}: no key {json_key!r} (use --json-key)")
            value = record[json_key]
            if isinstance(value, list):  # chat-style records: join the message contents
                value = "\n".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in value)
            yield str(value)
