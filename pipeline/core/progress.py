"""Logging setup and progress bars that report throughput.

Every long loop goes through `progress()` or `progress_bar()`: a tqdm bar on a terminal (quiet in
logs and CI unless asked) that stays on screen when the loop ends, and one log line at the end with
the count, the time and the rate, so throughput is recorded even where no bar is drawn. A loop may
show its latest numbers beside the bar (`update(1, loss=0.42)`); the final ones end the log line.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)


# Libraries that talk at INFO about their own plumbing: MLflow's system-metrics sampler says it
# started, stopped and skips GPU metrics in every training loop, in its own unformatted lines.
QUIET_LOGGERS = ("urllib3", "alembic", "git", "httpx", "filelock", "mlflow.system_metrics")


def setup_logging(level: str | int = "INFO") -> None:
    """Configure root logging once: rich handler on a terminal, plain lines otherwise; the chatty
    libraries (QUIET_LOGGERS) log warnings only."""
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
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


def bars_enabled() -> bool:
    """Bars draw on a terminal; `MAM2_PROGRESS=1` forces them, `MAM2_PROGRESS=0` hides them."""
    forced = os.environ.get("MAM2_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "no")
    return sys.stderr.isatty()


def format_postfix(values: dict[str, object]) -> str:
    """`loss 0.4213  lr 0.0003`: numbers to 4 significant digits, other values as they are."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)
                     else f"{k} {v}" for k, v in values.items())


class Throughput:
    """Counts work units between start and `done()`, and logs the rate (and the latest `postfix`)."""

    def __init__(self, what: str, unit: str) -> None:
        self.what, self.unit = what, unit
        self.count = 0
        self.start = time.perf_counter()
        self.postfix: dict[str, object] = {}

    def add(self, n: int = 1) -> None:
        self.count += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / max(self.seconds, 1e-9)

    def done(self) -> None:
        tail = f"; {format_postfix(self.postfix)}" if self.postfix else ""
        log.info("%s: %d %s in %.1f s (%.1f %s/s)%s", self.what, self.count, self.unit,
                 self.seconds, self.rate, self.unit, tail)


class Update(Protocol):
    """The callback `progress_bar` yields: `update(n)`, or `update(n, loss=0.42, lr=3e-4)` to also
    show those numbers beside the bar (and at the end of the closing log line)."""

    def __call__(self, n: int = 1, /, **postfix: object) -> None: ...


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str = "it", total: int | None = None,
                 leave: bool = True) -> Iterator[Update]:
    """Yield an `update(n, **postfix)` callback driving a bar (when enabled); log the throughput at
    the end. The bar stays on screen when done (`leave=False` erases it, for inner loops)."""
    meter = Throughput(desc, unit)
    bar = tqdm(desc=desc, unit=unit, total=total, disable=not bars_enabled(), dynamic_ncols=True,
               leave=leave)

    def update(n: int = 1, /, **postfix: object) -> None:
        if postfix:
            meter.postfix.update(postfix)
            if not bar.disable:
                bar.set_postfix_str(format_postfix(meter.postfix), refresh=False)
        bar.update(n)
        meter.add(n)

    try:
        yield update
    finally:
        bar.close()
    meter.done()


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None,
             leave: bool = True) -> Iterator[T]:
    """Iterate with a progress bar (when enabled) and log the throughput when the loop ends."""
    with progress_bar(desc, unit=unit, total=total, leave=leave) as update:
        for item in items:
            yield item
            update(1)
