"""What a person watching a job sees: one progress line, and a one-line failure.

On a terminal the line is redrawn in place; otherwise (logs, CI) a full line is
printed every ``interval_s`` seconds. Ray Data's own progress bars and operator
dumps stay hidden unless ``--verbose``.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts input rows done and statuses, and shows them.

    Args:
        total: input rows this run processes.
        stream: where to write (stderr by default).
        enabled: False shows nothing (library use, tests).
        interval_s: seconds between lines when the stream is not a terminal.
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True,
                 interval_s: float = 10.0) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.interval_s = interval_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.done = 0
        self.statuses: Counter = Counter()
        self._last_shown = 0.0
        self._shown_done = -1  # rows done at the last line shown

    def update(self, keys: int, statuses: dict[str, int]) -> None:
        self.done += keys
        self.statuses.update(statuses)
        now = time.monotonic()
        if self.enabled and (self.tty and now - self._last_shown >= 0.2 or now - self._last_shown >= self.interval_s):
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        share = 100.0 * self.done / self.total if self.total else 100.0
        counts = " ".join(f"{status}={count}" for status, count in sorted(self.statuses.items()))
        return (f"{self.done}/{self.total} rows ({share:.0f}%)  {rate:.1f} rows/s  "
                f"ETA {_duration(eta) if eta is not None else '?'}  {counts}").rstrip()

    def _show(self, now: float) -> None:
        self._last_shown = now
        self._shown_done = self.done
        if self.tty:
            self.stream.write("\r\033[K" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._shown_done != self.done:  # the last line, unless it is already out
            self._show(time.monotonic())
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# Ray's wrappers around a user's exception, and the lines they add.
_WRAPPERS = ("UserCodeException", "RayTaskError", "RayActorError", "RaySystemError")
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Failure|Failed|Interrupt|Held|Changed))(:|$)")


def first_real_error(exc: BaseException) -> str:
    """The user's own error inside a failed Ray job, in one line, not pages of Ray stats."""
    texts = []
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current}")
        cause = getattr(current, "cause", None)  # RayTaskError keeps the user's exception here
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    for text in reversed(texts):  # innermost first
        for line in reversed(text.splitlines()):
            match = _ERROR_LINE.match(line)
            if match and not any(wrapper in match.group(1) for wrapper in _WRAPPERS):
                return line.strip()
    return texts[-1].splitlines()[0]
