"""Terminal output shared by the pipelines: one rich console, progress bars with rows/s and tokens/s."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)


class _RateColumn(ProgressColumn):
    """rows/s and tokens/s since the bar started."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        tokens = task.fields.get("tokens", 0)
        info = task.fields.get("info", "")
        unit = task.fields.get("unit", "rows")
        done = task.completed - task.fields.get("start", 0)
        return Text(f"{done / elapsed:.2f} {unit}/s  {tokens / elapsed:,.0f} tok/s  {info}", style="cyan")


@contextmanager
def progress_bar(description: str, total: int, *, unit: str = "rows", completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yield ``advance(rows, tokens, info="")``; the bar shows rows done, rows/s, tokens/s, info and the time left."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=total == 0,
    ) as progress:
        task = progress.add_task(description, total=total, tokens=0, unit=unit, info="", completed=completed, start=completed)
        tokens = 0

        def advance(rows: int, new_tokens: int = 0, info: str = "") -> None:
            nonlocal tokens
            tokens += new_tokens
            progress.update(task, advance=rows, tokens=tokens, info=info)

        yield advance


def rich_table(rows: list[dict], columns: list[str], *, title: str = "", float_fmt: str = "{:.3f}",
               compact: bool = False) -> Table:
    """A table for the terminal. ``compact``: no vertical rules, and names fold onto a second line rather than
    being cut with an ellipsis (two teachers "qwen2…" are indistinguishable)."""
    from rich import box

    table = Table(title=title, show_lines=False, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
                  pad_edge=not compact)
    for col in columns:
        left = col in ("teacher", "metric", "name", "set", "signal", "id", "route", "text", "category",
                       "description", "install")
        table.add_column(col, justify="left" if left else "right", overflow="fold",
                         no_wrap=not left, min_width=len(col))
    for row in rows:
        cells = []
        for col in columns:
            v = row.get(col, "")
            cells.append(float_fmt.format(v) if isinstance(v, float) else str(v))
        table.add_row(*cells)
    return table


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
