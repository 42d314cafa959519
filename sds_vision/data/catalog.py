"""Names of benchmark tasks: one lookup (canonical name or alias) and one list resolver
for VTAB-1k, FGVC and the SDS-LoRA paper's suite, and the error their data roots raise."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from sds_vision.data.folder import DataError

T = TypeVar("T")


class BenchmarkDataError(DataError):
    """A benchmark data root is malformed. The message is one line naming file and line.
    (``DataError`` is the package's data ``ValueError``.)"""


def name_key(name: str) -> str:
    """How names compare: case-insensitive, surrounding blanks ignored, '-' == '_'."""
    return name.strip().lower().replace("-", "_")


def lookup(name: str, table: Mapping[str, T], aliases: Mapping[str, str], what: str) -> T:
    """``table``'s entry for a canonical name or alias; one line listing both when unknown."""
    key = aliases.get(name_key(name), name_key(name))
    if key not in table:
        raise BenchmarkDataError(f"unknown {what} {name!r}; known: {', '.join(table)} "
                                 f"(aliases: {', '.join(sorted(aliases))})")
    return table[key]


def pick(names: str | Iterable[str], resolve: Callable[[str], T],
         groups: Mapping[str, list[T]]) -> list[T]:
    """Resolve names in order without repeats; a name in ``groups`` (``all``, a group)
    stands for its members."""
    out: list[T] = []
    for n in [names] if isinstance(names, str) else names:
        out += [x for x in (groups[n] if n in groups else [resolve(n)]) if x not in out]
    return out
