"""The quickstart's embedded corpus: real English/Python text shipped with every Python, so nothing is downloaded.

Documents: each `pydoc_data.topics` entry (the language reference sections `help()` shows), then one document per
standard-library module with its module, class and function docstrings (read with `ast`, never imported: importing
`antigravity` opens a browser, `this` prints). The order is sorted, so the corpus is the same on every run.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from typing import Iterator, Optional

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
             "ensurepip", "venv"}


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _module_doc(path: str, name: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {name}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            sub = ast.get_docstring(node)
            if sub and len(sub) > 40:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {node.name}\n\n{sub}")
    return "\n\n".join(parts) if parts else None


def stdlib_docstrings() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, filename), root)
            name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
            doc = _module_doc(os.path.join(dirpath, filename), name)
            if doc:
                yield doc


def write_embedded_corpus(path: str, max_chars: Optional[int] = None) -> dict:
    """Write the corpus as JSON lines ({"text": ...}); stop before `max_chars` characters. Returns counts."""
    docs = chars = 0
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        for source in (pydoc_topics(), stdlib_docstrings()):
            for text in source:
                if max_chars is not None and chars + len(text) > max_chars:
                    continue  # a shorter document may still fit; the order stays fixed
                fh.write(json.dumps({"text": text}) + "\n")
                docs += 1
                chars += len(text)
    os.replace(tmp, path)
    return {"documents": docs, "characters": chars}
