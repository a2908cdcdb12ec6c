"""The training progress bar: live on a terminal, a line every 30 s in a file (a Slurm log)."""

from __future__ import annotations

import sys


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm's bar over the training steps: redrawn often on a terminal; into a file (a Slurm log) every 30 s, each
    redraw a line of its own (maxinterval too: tqdm's monitor thread otherwise forces a redraw every 10 s)."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                    mininterval=0.1)
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", file=_BarLines(), mininterval=30,
                maxinterval=30)


class _BarLines:
    """A file for tqdm that ends each redraw with a newline: tqdm starts a redraw with a carriage return and leaves
    the line open, so in a file the next log record was written onto the bar's line."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()
