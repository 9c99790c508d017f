"""Random streams derived from (seed, purpose, ...) so that no two uses of one seed are correlated.

numpy's legacy RandomState is used on purpose: its streams are frozen across numpy versions (Generator's are not
promised to be), so an index rebuilt on another machine, or a mask drawn after an upgrade, is the same.
"""

from __future__ import annotations

import numpy as np

# purposes (never reuse a number: it would correlate two streams)
DOCUMENT_SHUFFLE = 1
SAMPLE_SHUFFLE = 2
MLM_MASKING = 3


def random_state(*parts: int) -> np.random.RandomState:
    """A RandomState seeded by the non-negative integers `parts` (each < 2^64), in order."""
    words = []
    for part in parts:
        part = int(part)
        if not 0 <= part < 2 ** 64:
            raise ValueError(f"seed part {part} is outside [0, 2^64)")
        words += [part & 0xFFFFFFFF, part >> 32]
    return np.random.RandomState(np.asarray(words, dtype=np.uint32))
