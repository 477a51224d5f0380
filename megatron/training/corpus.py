"""Reading raw documents for the data tools: a JSONL file (one document per line) or a folder of text
files (one document per file), always in a deterministic order."""
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


def iter_documents(path: str, json_key: str = "text", pattern: str = "*", recursive: bool = True,
                   ) -> Iterator[str]:
    """Yield the text of every document of ``path`` (a ``.jsonl``/``.json`` file or a folder)."""
    if os.path.isdir(path):
        files = list_files(path, pattern, recursive)
        if not files:
            raise FileNotFoundError(f"{path}: no files match {pattern!r}")
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield fh.read()
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (give a JSONL file or a folder of text files)")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
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
