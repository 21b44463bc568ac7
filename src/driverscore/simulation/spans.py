"""Runs of consecutive fixes (a glitch, a dropout, a stretch of wrong map limit).

Such events are rare, so the rows they cover are listed explicitly: the cost follows the
events, not the length of the track.
"""

from __future__ import annotations

import numpy as np


def span_rows(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the spans ``[start, stop)`` and, for each row, the index of its span.

    Rows of overlapping spans appear once per span.
    """
    length = np.maximum(np.asarray(stop, np.int64) - start, 0)
    span = np.repeat(np.arange(len(length)), length)
    first = np.cumsum(length) - length
    rows = np.asarray(start, np.int64)[span] + (np.arange(len(span)) - first[span])
    return rows, span
