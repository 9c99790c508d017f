"""DeepSpeed's BF16_Optimizer prints a memory report while it is built (`see_memory_usage(..., force=True)`: a
message, an "MA ... GB" line and a "CPU Virtual Memory: ..." line, five times), on rank 0, with print(): fifteen
lines at the top of every bf16 ZeRO-1 run's log, wherever the logging level is set. They are dropped; anything
else printed meanwhile passes through."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Iterator


def drop_memory_reports(text: str) -> str:
    lines, kept, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        if i + 2 < len(lines) and lines[i + 1].startswith("MA ") and lines[i + 2].startswith("CPU Virtual Memory:"):
            i += 3
            continue
        kept.append(lines[i])
        i += 1
    return "".join(kept)


@contextlib.contextmanager
def without_memory_reports() -> Iterator[None]:
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        sys.stdout.write(drop_memory_reports(buffer.getvalue()))
        sys.stdout.flush()
