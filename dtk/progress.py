"""Progress on stderr: a rich bar on a terminal, throttled plain lines elsewhere.

Slurm logs and CI capture stderr to a file, where a redrawn bar turns into
thousands of lines; there we print at most one line every few seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("dtk")
_LIVE: list["Progress"] = []   # the rich bars being drawn now (innermost last)


def plain_interval() -> float:
    """Seconds between plain progress lines (DTK_PROGRESS_INTERVAL, default 5); checked when dtk starts."""
    from dtk.errors import BadInput

    text = os.environ.get("DTK_PROGRESS_INTERVAL", "5")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0 or seconds == float("inf"):
        raise BadInput(f"DTK_PROGRESS_INTERVAL={text}: want a number of seconds (0 or more)")
    return seconds


class Progress:
    def __init__(self, total: int, label: str, unit: str = "it", enabled: bool = True):
        self.total, self.label, self.unit = total, label, unit
        self.done = 0
        self.start = time.monotonic()
        self._last_print = 0.0
        self._rich = None
        self.enabled = enabled and total > 0
        self.interval = plain_interval()
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

            # drawn only when it advances (no refresh thread), so a result line can be put above it without a
            # race: see ``above_bar``
            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False, auto_refresh=False,
                redirect_stdout=False, redirect_stderr=False,  # stdout is for JSON lines only
            )
            self._task = self._rich.add_task(label, total=total)
            self._rich.start()
            self._rich.refresh()
            _LIVE.append(self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(ok=exc[0] is None)

    def update(self, n: int = 1) -> None:
        from dtk import signals

        signals.check()   # between batches: a safe point to act on SIGTERM
        if self.done == 0:   # the first results are in: say how many CPU threads made them (once per run)
            from dtk import threads

            if self._rich is not None:
                sys.stderr.write("\r\x1b[2K")   # above the bar, which is drawn again just below
            threads.report()
        self.done += n
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
            self._rich.refresh()
            return
        now = time.monotonic()
        if now - self._last_print >= self.interval or self.done >= self.total:
            self._last_print = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(
                f"{self.label}: {self.done}/{self.total} {self.unit} "
                f"({100 * self.done / self.total:.0f}%, {rate:.2f} {self.unit}/s, eta {eta:.0f}s)",
                file=sys.stderr, flush=True,
            )

    def close(self, ok: bool = True) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            if self in _LIVE:
                _LIVE.remove(self)


def write_above_bar(write) -> None:
    """Run ``write`` (which prints whole lines on stdout) so that, where stdout and a live bar share a
    terminal, the lines stand alone above the bar instead of being appended to it."""
    bar = _LIVE[-1] if _LIVE else None
    if bar is None or bar._rich is None or not sys.stdout.isatty():
        write()
        return
    sys.stderr.write("\r\x1b[2K")   # the bar's line cleared; it is drawn again below the new lines
    sys.stderr.flush()
    write()
    bar._rich.refresh()
