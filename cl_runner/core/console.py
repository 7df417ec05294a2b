"""Console helpers shared by everything that prints a table (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def print_whole(console: Console, table: Table) -> None:
    """Print ``table`` with no cell cut. To a file or pipe, or where even folded cells do not fit, at its natural
    width (a terminal may wrap the lines, but every name and number is whole); else at the console's width, long
    names folded onto more lines (columns made with ``overflow="fold"``)."""
    natural = Measurement.get(console, console.options.update_width(10_000), table)
    width = console.width
    if not console.is_terminal or width < natural.minimum:
        console.width = max(width, natural.maximum)
    try:
        console.print(table)
    finally:
        console.width = width
