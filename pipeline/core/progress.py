"""Logging setup and progress bars that report throughput.

Every long loop goes through `progress()`: a tqdm bar on a terminal (quiet in logs and CI unless
asked), and one log line at the end with the count, the time and the rate, so throughput is
recorded even where no bar is drawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)


def setup_logging(level: str | int = "INFO") -> None:
    """Configure root logging once: rich handler on a terminal, plain lines otherwise."""
    if logging.getLogger().handlers:
        logging.getLogger().setLevel(level)
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("urllib3", "alembic", "git", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def bars_enabled() -> bool:
    """Bars draw on a terminal; `MAM2_PROGRESS=1` forces them, `MAM2_PROGRESS=0` hides them."""
    forced = os.environ.get("MAM2_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "no")
    return sys.stderr.isatty()


class Throughput:
    """Counts work units between start and `done()`, and logs the rate."""

    def __init__(self, what: str, unit: str) -> None:
        self.what, self.unit = what, unit
        self.count = 0
        self.start = time.perf_counter()

    def add(self, n: int = 1) -> None:
        self.count += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / max(self.seconds, 1e-9)

    def done(self) -> None:
        log.info("%s: %d %s in %.1f s (%.1f %s/s)", self.what, self.count, self.unit,
                 self.seconds, self.rate, self.unit)


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str = "it", total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yield an `update(n)` callback driving a bar (when enabled); log the throughput at the end."""
    meter = Throughput(desc, unit)
    bar = tqdm(desc=desc, unit=unit, total=total, disable=not bars_enabled(), dynamic_ncols=True,
               leave=False)

    def update(n: int = 1) -> None:
        bar.update(n)
        meter.add(n)

    try:
        yield update
    finally:
        bar.close()
    meter.done()


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (when enabled) and log the throughput when the loop ends."""
    with progress_bar(desc, unit=unit, total=total) as update:
        for item in items:
            yield item
            update(1)
