"""Option values given as text, read the same way wherever they come from (command line, config file, dtk.json)."""

from __future__ import annotations

from typing import Callable


def comma_values(text, kind: Callable = float) -> list:
    """"a, b,c" as [kind(a), kind(b), kind(c)]: the one reader of every comma-list option (blanks around items
    and empty items are ignored); ValueError when an item is not a ``kind``."""
    return [kind(x) for x in (item.strip() for item in str(text).split(",")) if x]
