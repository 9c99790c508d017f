"""From a raw record to a document's text, or to the reason it is skipped; and the tally of skipped records.

Readers (`sources.py`) hand out raw items cheaply (a JSONL line as bytes, a CSV cell, a parquet value); the checks and
JSON parsing run here, in the tokenizing workers, so they run in parallel and identically whatever the worker count.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

# kinds of raw items
JSON_LINE = 0  # payload: bytes of one JSON Lines line
OBJECT = 1  # payload: a parsed JSON value (an element of a JSON array)
RAW = 2  # payload: the bytes of a whole document (a .txt file, line or paragraph)
TEXT = 3  # payload: a value from a column (str, None or anything else)
SKIP = 4  # payload: (reason, detail, count), decided by the reader itself

# why a record is skipped (the keys of manifest["skipped"])
REASONS = {
    "invalid_json": "malformed JSON",
    "not_object": "JSON value is not an object",
    "missing_key": "no text field",
    "not_text": "text field is not a string",
    "empty": "empty document",
    "invalid_utf8": "invalid UTF-8",
    "empty_file": "empty file",
    "unreadable": "unreadable path or file",
}


def record_text(kind: int, payload: Any, text_key: str) -> tuple[Optional[str], Optional[str], str]:
    """(text, None, "") for a usable document, else (None, reason, detail)."""
    if kind == SKIP:
        reason, detail, _count = payload
        return None, reason, detail
    if kind == RAW:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            line = payload.count(b"\n", 0, err.start) + 1
            column = err.start - (payload.rfind(b"\n", 0, err.start) + 1) + 1
            return None, "invalid_utf8", f"byte 0x{payload[err.start]:02x} at line {line}, column {column}"
        return _check_text(text, surrogates_possible=False)
    if kind == JSON_LINE:
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            return None, "invalid_utf8", f"byte 0x{payload[err.start]:02x} at column {err.start + 1}"
        try:
            payload = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            return None, "invalid_json", f"{err.msg} (column {err.colno})"
        kind = OBJECT
    if kind == OBJECT:
        if not isinstance(payload, dict):
            return None, "not_object", f"a JSON {type(payload).__name__}, not an object"
        if payload.get(text_key) is None:
            if text_key in payload:
                return None, "missing_key", f"{text_key!r} is null"
            fields = ", ".join(sorted(map(str, payload))[:8]) or "none"
            return None, "missing_key", f"no {text_key!r} field (fields: {fields})"
        payload = payload[text_key]
    elif payload is None:  # TEXT
        return None, "missing_key", f"{text_key!r} is null"
    if not isinstance(payload, str):
        return None, "not_text", f"{text_key!r} is a {type(payload).__name__}, not a string"
    return _check_text(payload, surrogates_possible=True)


def _check_text(text: str, surrogates_possible: bool) -> tuple[Optional[str], Optional[str], str]:
    if not text or text.isspace():
        return None, "empty", "no text" if not text else "whitespace only"
    if surrogates_possible:
        # lone surrogates come from JSON "\ud800" escapes or from bytes decoded with errors="surrogateescape" (CSV)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return None, "invalid_utf8", f"lone surrogate U+{ord(text[err.start]):04X} at character {err.start + 1}"
    return text, None, ""


class Problems:
    """Counts of skipped records by reason, with the location of the first few of each."""

    def __init__(self, max_examples: int = 5):
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str, detail: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: "Problems") -> None:
        """Add `other`'s counts; its examples come after ours (both are in input order)."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            examples = self.examples.setdefault(reason, [])
            examples.extend(other.examples.get(reason, [])[: self.max_examples - len(examples)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)

    def copy(self) -> "Problems":
        new = Problems(self.max_examples)
        new.merge(self)
        return new

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], max_examples: int = 5) -> "Problems":
        new = cls(max_examples)
        new.counts = {k: int(v) for k, v in data.get("counts", {}).items()}
        new.examples = {k: list(v) for k, v in data.get("examples", {}).items()}
        return new

    @classmethod
    def combined(cls, parts: Iterable["Problems"], max_examples: int = 5) -> "Problems":
        total = cls(max_examples)
        for part in parts:
            total.merge(part)
        return total

    def report(self) -> list[str]:
        """Human-readable lines: one per reason with its count, then its first locations."""
        lines = []
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason} ({REASONS.get(reason, reason)}): {count}")
            lines.extend(f"      {example}" for example in self.examples.get(reason, []))
        return lines
