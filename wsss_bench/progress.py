"""Progress bars that disappear under ``--quiet`` and when output is not a terminal."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, enabled: bool = True,
                 total: int | None = None) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return iter(items)
    return iter(tqdm(items, desc=description, total=total, file=sys.stderr, leave=False,
                     dynamic_ncols=True, mininterval=0.5))
