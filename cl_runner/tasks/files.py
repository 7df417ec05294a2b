"""Local data files read once, line by line, before ``datasets`` loads them: what it would reject with "An error
occurred while generating the dataset" (or take in silently, as a list where text belongs) is named here with its
file, line and column instead.

A UTF-8 byte-order mark at the start of a file is accepted (``datasets`` reads it too; docs/tasks.md).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from cl_runner.core.errors import DataError

# One row of a data file: the json loader of ``datasets`` reads 10 MiB chunks, and a longer row is no prompt or
# document a causal LM trains on (a run on one 30 MB row was still preparing its data after 5 minutes).
MAX_LINE_BYTES = 10 << 20
# Fed to the csv reader after a file's last line: a quote left open swallows it into a value, a file that ends
# cleanly returns it as a row of its own (pandas, which ``datasets`` uses, stops there with "EOF inside string").
_END = "\x1ecl-runner-end-of-file\x1e"


def local_files(files: Any) -> list[Path]:
    """The local files among ``data_files`` (resolved), each once; URLs and globs are left to ``datasets``."""
    if isinstance(files, dict):
        return list(dict.fromkeys(p for v in files.values() for p in local_files(v)))
    if isinstance(files, list | tuple):
        return list(dict.fromkeys(p for v in files for p in local_files(v)))
    return [Path(files)] if files is not None and Path(str(files)).is_file() else []


def lines(path: Path, key: str, max_bytes: int | None = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of every line, stopping at the first bytes that are not UTF-8 (``datasets`` reads
    UTF-8 and names neither the file nor the line) and at a line longer than ``max_bytes``."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(iter(partial(handle.readline, max_bytes + 1 if max_bytes else -1), b""), 1):
            if max_bytes and len(raw) > max_bytes:
                raise DataError(f"{key}: {path} line {number} is longer than {max_bytes >> 20} MiB, the most one "
                                "row may hold; split its text over several rows")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{key}: {path} line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                f"position {exc.start + 1} of the line); save the file as UTF-8") from None
            yield number, text.removeprefix("\ufeff") if number == 1 else text


def not_text(value: Any) -> str | None:
    """``"a list"`` or ``"a mapping"`` for a value that is no text (a string or a number reads as its text)."""
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else None


def check_json_lines(path: Path, key: str, columns: Collection[str] = ()) -> None:
    """One JSON object per line (blank lines skipped), and at least one, whose ``columns`` hold text; a ``.json``
    file holding one JSON document (a list, or an object spread over lines) is only checked for UTF-8 and left to
    ``datasets`` (its rows' values are checked when they are formatted)."""
    with open(path, "rb") as handle:
        if path.suffix == ".json" and handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
            return check_utf8(path, key, max_bytes=None)
    rows = 0
    for number, line in lines(path, key):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if path.suffix == ".json" and rows == 0 and line.lstrip()[:1] == "{":  # an object over lines
                return check_utf8(path, key, max_bytes=None)
            raise DataError(f"{key}: {path} line {number} is not valid JSON ({_json_reason(exc, line)})") from None
        if not isinstance(value, dict):
            raise DataError(f"{key}: {path} line {number} is not a JSON object but {_json_kind(value)}; each "
                            "line must hold one {...} row")
        for column in columns:
            kind = not_text(value.get(column))
            if kind:  # datasets would train on its Python repr, "['a', 'b']"
                raise DataError(f"{key}: {path} line {number}: column {column!r} holds {kind}, not text (a string "
                                "or number); give it the text to train on")
        rows += 1
    if not rows:
        raise DataError(f"{key}: {path} has no rows (only blank lines)")


def _json_reason(exc: json.JSONDecodeError, line: str) -> str:
    """The decoder's reason whole: its ``msg`` with the column it ends on ("Unterminated string starting at" is
    no phrase alone), and what a string left open at the end of the line means in a JSON-lines file."""
    reason = f"{exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"
    at_end = exc.pos >= len(line.rstrip("\r\n"))  # the line break itself is the bad character
    if exc.msg.startswith("Unterminated string") or (exc.msg.startswith("Invalid control") and at_end):
        reason += "; a value holds a line break, which JSON writes as \\n"
    return reason


def check_utf8(path: Path, key: str, columns: Collection[str] = (), max_bytes: int | None = MAX_LINE_BYTES) -> None:
    for _ in lines(path, key, max_bytes):
        pass


def _json_kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def check_csv(path: Path, key: str, columns: Collection[str] = ()) -> None:
    """A header, then at least one row, no row with more fields than the header (``datasets`` via pandas
    rejects those with a generic message) and no quote left open at the end; blank lines are skipped, as pandas
    does."""
    def then_end() -> Iterator[str]:
        yield from (text for _, text in lines(path, key))
        yield from ("\n", _END + "\n")  # on a line of its own, whether or not the file ends with a newline

    reader = csv.reader(then_end())
    header, header_line, rows, row_start = None, 0, 0, 1  # row_start: the line the next row starts on
    for row in reader:
        if row == [_END]:
            break
        if any(_END in field for field in row):
            raise DataError(f"{key}: {path} line {row_start} opens a quoted value (\") that is never closed; close "
                            "it, or double a quote inside a quoted value (\"\")")
        first_line, row_start = row_start, reader.line_num + 1
        if not any(field.strip() for field in row):
            continue
        if header is None:
            header, header_line = row, first_line
            continue
        if len(row) > len(header):
            raise DataError(f"{key}: {path} line {reader.line_num} has {len(row)} fields, the header (line "
                            f"{header_line}) has {len(header)}")
        rows += 1
    if header is None:
        raise DataError(f"{key}: {path} has no rows (only blank lines)")
    if not rows:
        raise DataError(f"{key}: {path} has a header (line {header_line}) but no rows")


# builder (TaskConfig.path) -> (file suffixes read line by line, check); other files go to ``datasets`` unread
LINE_CHECKS = {"json": ((".jsonl", ".json"), check_json_lines), "jsonl": ((".jsonl", ".json"), check_json_lines),
               "csv": ((".csv",), check_csv), "text": ((".txt",), check_utf8)}


def check_files(files: Any, builder: str | None, key: str, columns: Collection[str] = ()) -> None:
    """Read each local file of a json/csv/text task once before ``datasets`` does; ``columns``: those that must
    hold text (the prompt's and the target's)."""
    suffixes, check = LINE_CHECKS.get(builder or "", ((), None))
    for path in local_files(files):
        if check is not None and path.suffix in suffixes:
            check(path, key, columns)
