"""Timing side by side: a piece of work against an anchor (one gradient) timed right before it, alternately.

Ratios of the two survive a loaded, shared machine (a slow drift moves both timings of a pair together);
the clock is the process' CPU time by default, which counts the computation and not the waiting for a
core (measure_overhead.py's ``paired_times`` follows the same rule).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def paired_ratio(
    fn: Callable[[], object], anchor: Callable[[], object], rounds: int,
    clock: Callable[[], float] = time.process_time,
) -> tuple[float, list[float]]:
    """Median over ``rounds`` of ``time(fn) / time(anchor)``, each ``fn`` timed right after an ``anchor``.

    Returns the median ratio and the anchor's times (seconds).
    """
    ratios, anchors = [], []
    for _ in range(rounds):
        t0 = clock()
        anchor()
        t1 = clock()
        fn()
        t2 = clock()
        anchors.append(t1 - t0)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios), anchors
