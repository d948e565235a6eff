"""Progress of long-running commands: a tqdm bar on a terminal, plain lines otherwise.

```python
from pccl.progress import progress

for size in progress(sizes, "sizes", unit="size"):      # iterate; closed at the end
    ...

with progress(rounds, "training", unit="round") as bar:  # or count by hand
    bar.update(1, loss=f"{loss:.3f}", peers=4)           # advance; fields shown next to it
    bar.write("peer 3 killed")                            # a line that does not break the bar
```

The mode is decided once, when the bar is made: when its stream (default
``sys.stderr``) is a terminal, a tqdm bar redrawn in place; otherwise (a log file,
a pipe, CI) one plain line at most every ``interval`` seconds plus a final line,
never any carriage returns or escape sequences. Never both. ``mode="off"`` prints
nothing but the lines passed to :meth:`Progress.write`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Generic, Iterable, Iterator, TextIO, TypeVar, overload

__all__ = ["MODES", "Progress", "progress"]

T = TypeVar("T")
MODES = ("auto", "tty", "plain", "off")
# A plain line at most this often by default: a long run stays readable in a log.
DEFAULT_INTERVAL = 10.0


def _clock_text(seconds: float) -> str:
    """``75.2`` -> ``"01:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _plural(unit: str) -> str:
    """The unit as plain lines print it after a count: ``"round"`` -> ``" rounds"``; tqdm's
    default ``"it"`` prints nothing."""
    if unit in ("", "it"):
        return ""
    return f" {unit}" if unit.endswith("s") else f" {unit}s"


def _terminal_size(stream: TextIO) -> tuple[int, int]:
    """(columns, rows) of the terminal behind ``stream``, with 80 x 24 for what it cannot tell.

    A terminal may report 0 x 0 (a pty nobody sized, e.g. under ``script`` or some CI
    runners); tqdm would then draw an empty bar, or hide it.
    """
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal
        return 80, 24
    return size.columns or 80, size.lines or 24


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class Progress(Generic[T]):
    """One progress bar (see the module docstring); use :func:`progress` to make one.

    ``total``: steps expected (``None``: unknown). ``desc``: what is counted, shown first.
    ``unit``: the step's name. ``stream``: where the bar or the lines go (default
    ``sys.stderr``, looked up when the bar is made). ``mode``: ``"auto"`` (tty if
    ``stream`` is a terminal, else plain), ``"tty"``, ``"plain"`` or ``"off"``.
    ``interval``: plain mode's minimum seconds between lines. ``clock``: monotonic
    seconds (tests pass a fake one). Use a bar from one thread at a time.

    Raises:
        ValueError: an unknown ``mode``, a negative ``total`` or ``interval``.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        *,
        unit: str = "it",
        stream: TextIO | None = None,
        mode: str = "auto",
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        iterable: Iterable[T] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.total, self.desc, self.unit = total, desc, unit
        self.stream: TextIO = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "tty" if _is_tty(self.stream) else "plain"
        self.mode = mode
        self.interval = interval
        self.count = 0
        self.fields: dict[str, str] = {}
        self._clock = clock
        self._start = self._last_line = clock()
        self._iterable = iterable
        self._closed = False
        self._bar: Any = None
        if mode == "tty":
            from tqdm import tqdm

            columns, rows = _terminal_size(self.stream)
            # The bar stays on screen when done (leave).
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, ncols=columns, nrows=rows,
                             leave=True, mininterval=0.2)

    @property
    def tty(self) -> bool:
        """Whether this bar draws a tqdm bar (else plain lines, or nothing)."""
        return self.mode == "tty"

    def update(self, n: int = 1, **fields: object) -> None:
        """Advance by ``n`` steps; ``fields`` (name=value) are shown next to the count."""
        self.count += n
        if fields:
            self._set(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(self.fields, refresh=False)
            self._bar.update(n)
        elif self.mode == "plain":
            now = self._clock()
            if now - self._last_line >= self.interval:
                self._line(self._status(now))
                self._last_line = now

    def set_fields(self, **fields: object) -> None:
        """Change the fields shown without advancing."""
        self._set(fields)
        if self._bar is not None:
            self._bar.set_postfix(self.fields)

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print ``text`` as a line of its own (to ``file``, default the bar's stream) without
        breaking the bar: in tty mode the bar is cleared, the line printed, the bar redrawn."""
        out = file if file is not None else self.stream
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=out)
            out.flush()
        else:
            print(text, file=out, flush=True)

    def close(self, failed: bool = False) -> None:
        """End the bar: tqdm leaves it on screen; plain mode prints the final line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain":
            now = self._clock()
            verb = "stopped at" if failed else "done,"
            self._line(f"{self._prefix()}{verb} {self._count_text()} in {_clock_text(now - self._start)}"
                       + self._fields_text())

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(failed=exc_type is not None)

    def __iter__(self) -> Iterator[T]:
        """The wrapped iterable's items, counting each; the bar closes when they run out.

        Raises:
            TypeError: the bar was made from a count, not an iterable.
        """
        if self._iterable is None:
            raise TypeError("this progress bar counts by hand (update); give progress() an iterable to iterate")
        return self._iterate(self._iterable)

    def _iterate(self, items: Iterable[T]) -> Iterator[T]:
        ok = False
        try:
            for item in items:
                yield item
                self.update(1)
            ok = True
        finally:
            self.close(failed=not ok)

    # -- plain lines -----------------------------------------------------------------------

    def _set(self, fields: dict[str, object]) -> None:
        self.fields.update({k: str(v) for k, v in fields.items()})

    def _prefix(self) -> str:
        label = f" {self.desc}" if self.desc else ""
        return f"{time.strftime('%H:%M:%S')} progress{label}: "

    def _count_text(self) -> str:
        unit = _plural(self.unit)
        if self.total:
            return f"{self.count}/{self.total}{unit} ({100 * self.count / self.total:.0f}%)"
        return f"{self.count}{unit}"

    def _fields_text(self) -> str:
        return "".join(f", {k}={v}" for k, v in self.fields.items())

    def _status(self, now: float) -> str:
        elapsed = now - self._start
        text = f"{self._prefix()}{self._count_text()}, {_clock_text(elapsed)} elapsed"
        if self.total and 0 < self.count < self.total and elapsed > 0:
            left = elapsed * (self.total - self.count) / self.count
            text += f", ~{_clock_text(left)} left"
        return text + self._fields_text()

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


@overload
def progress(items: int | None, desc: str = "", **kwargs: Any) -> Progress[Any]: ...


@overload
def progress(items: Iterable[T], desc: str = "", **kwargs: Any) -> Progress[T]: ...


def progress(items: Iterable[T] | int | None, desc: str = "", **kwargs: Any) -> Progress[Any]:
    """A :class:`Progress` over ``items`` (an iterable to wrap, or a total step count, or
    ``None`` for an unknown count). Keyword arguments go to :class:`Progress`
    (``unit``, ``stream``, ``mode``, ``interval``, ``clock``, and ``total`` to override
    the length taken from a sized iterable).

    Raises:
        ValueError: as :class:`Progress`.
    """
    if items is None or isinstance(items, int):
        return Progress(kwargs.pop("total", items), desc, **kwargs)
    total = kwargs.pop("total", None)
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return Progress(total, desc, iterable=items, **kwargs)
