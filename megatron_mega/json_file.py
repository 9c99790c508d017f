"""Reading a JSON file that must hold an object, with errors naming the file and line."""

from __future__ import annotations

import json
import os
from typing import Any


def load_json_object(path: str | os.PathLike, error: type[Exception], what: str = "a JSON object") -> dict[str, Any]:
    """The object in `path`; `error` (naming the file, and the line of a syntax error) when it is not JSON or not an
    object. `what` names the expected content in the second message."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise error(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not {what} (a JSON {type(data).__name__}, not an object)")
    return data
