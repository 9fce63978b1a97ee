"""Text output shared by the runner and the benchmarks: one table formatter, one progress bar."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any


def format_cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits (``-`` for NaN), anything else as ``str``."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell (cells by :func:`format_cell`)."""
    cells = [[format_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"


class Progress:
    """A progress bar over ``total`` steps on stderr: tqdm when installed, else a plain line
    with the rate, the elapsed time and an estimate of the time left. Silent when ``enabled``
    is False; ``done`` counts the steps advanced either way. After :meth:`epoch` it also shows
    the time per epoch and the estimated total time."""

    def __init__(self, total: int, label: str = "", enabled: bool = True):
        self.total, self.enabled, self.done = int(total), bool(enabled), 0
        self.start = time.perf_counter()
        self._label, self._extra, self._last = label, "", 0.0
        self._epoch: int | None = None
        self._tqdm = None
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm(total=self.total, unit="step", file=sys.stderr, leave=True)
                self._tqdm.set_description_str(label, refresh=False)
            except ImportError:
                pass

    def label(self, text: str) -> None:
        """Names what the next steps belong to."""
        self._label = text
        if self._tqdm is not None:
            self._tqdm.set_description_str(text, refresh=False)

    def epoch(self, steps_per_epoch: int | None) -> None:
        """Steps per epoch of what follows (``None``: no epochs shown)."""
        self._epoch = int(steps_per_epoch) if steps_per_epoch else None

    def timing(self) -> str:
        """``"<time>/epoch, total ≈ <time>"`` at the mean rate so far ("" before a step or
        without :meth:`epoch`)."""
        if not self._epoch or not self.done:
            return ""
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / self.done
        total = per_step * self.total
        return f"{_duration(per_step * self._epoch)}/epoch, total ≈ {_duration(total)}"

    def advance(self, n: int, extra: str = "") -> None:
        """``n`` more steps done; ``extra``: a short note shown after the bar (a loss...)."""
        self.update(self.done + n, extra)

    def update(self, done: int, extra: str = "") -> None:
        """``done`` steps done in all."""
        n, self.done, self._extra = done - self.done, int(done), extra
        if not self.enabled:
            return
        timing = self.timing()
        if timing:
            extra = f"{timing} {extra}".strip()
        if self._tqdm is not None:
            if extra:
                self._tqdm.set_postfix_str(extra, refresh=False)
            self._tqdm.update(n)
            return
        now = time.perf_counter()
        if self.done < self.total and now - self._last < 0.5:
            return
        self._last = now
        frac = self.done / max(self.total, 1)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        left = (self.total - self.done) / rate if self.done else float("nan")
        eta = _duration(left) if math.isfinite(left) else "?"
        sys.stderr.write(
            f"\r{self._label[:40]} [{bar}] {self.done}/{self.total} {rate:7.1f} it/s "
            f"{_duration(elapsed)} elapsed, {eta} left {extra}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        """Ends the bar's line."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()
