"""Progress reporting: tqdm bars on a terminal, plain log lines everywhere else.

A redirected run (``wsss run ... > run.log 2>&1``, a bench cell's log, CI) must not fill its
file with bar frames, so off a terminal each loop logs one line when it ends (count, time,
rate) and training logs one line per epoch (:func:`epoch_line`).  ``--quiet`` silences both.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Mapping, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("wsss_bench")


def on_terminal() -> bool:
    """Whether progress goes to an interactive terminal (stderr is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_bar(items: Iterable[T], description: str, enabled: bool = True,
                 total: int | None = None, summary: bool = True) -> Iterator[T]:
    """``items`` with a tqdm bar on a terminal, or one closing log line off it (``summary``)."""
    if not enabled:
        return iter(items)
    if on_terminal():
        return iter(tqdm(items, desc=description, total=total, file=sys.stderr, leave=False,
                         dynamic_ncols=True, mininterval=0.5))
    return _logged(items, description) if summary else iter(items)


def _logged(items: Iterable[T], description: str) -> Iterator[T]:
    start, count = time.perf_counter(), 0
    for item in items:
        count += 1
        yield item
    seconds = time.perf_counter() - start
    rate = f", {count / seconds:.1f}/s" if seconds > 0 else ""
    log.info("%s: %d done in %.1f s%s", description, count, seconds, rate)


def epoch_line(description: str, epoch: int, epochs: int, losses: Mapping[str, float],
               images_per_second: float, seconds_left: float) -> str:
    """One training log line: epoch, mean losses, speed and the time left in this training."""
    loss = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
    minutes, seconds = divmod(int(round(seconds_left)), 60)
    return (f"{description} epoch {epoch}/{epochs}: loss {loss} | {images_per_second:.1f} images/s"
            f" | ETA {minutes}m{seconds:02d}s")
