"""CSV and TSV files as records of cells, numbered by the line each record starts on (the header is line 1).

CSV cells may be quoted, as RFC 4180 and every CSV writer quote them. A TSV is one of two kinds. GLUE's files
take every cell as written: a quote is text (`it 's "good"`). Python's csv module and pandas quote a cell that
holds a tab, a newline or a quote (`"say ""hi"" twice"`), so such a cell may span lines. The first record holding a
quote decides: when it is exactly what the csv module writes for its cells, the file is quoted; otherwise cells
are taken as written. A file that mixes the two is refused, naming a line of each.
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import FormatError

QUOTING = "as Python's csv module and pandas quote a cell holding a newline, a tab or a quote"
ONE_WAY = "write the file one way: with Python's csv module or pandas, or every cell as it is"


class _Lines:
    """A file's lines, counted, that a csv reader pulls; the lines of the current record are `taken`."""

    def __init__(self, f):
        self._f, self.line, self.taken, self._pending = f, 0, [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text = self._pending.pop(0) if self._pending else next(self._f)
        self.line += 1
        self.taken.append(text)
        return text

    def start(self) -> int:
        """Begin a record; the line it will start on."""
        self.taken = []
        return self.line + 1

    def rewind(self) -> None:
        """Give back every line of the current record but its first."""
        back = self.taken[1:]
        self._pending[:0], self.taken, self.line = back, self.taken[:1], self.line - len(back)


def rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line, column -> cell) for each record of a CSV (`,`) or TSV (`\\t`) file after its header; blank lines
    and rows of empty cells are skipped.

    Raises:
        FormatError: a row with more or fewer cells than the header has columns; a TSV that quotes a cell in one
            place and holds a bare quote in another, naming a line of each.
    """
    records = _records(path, delimiter)
    header = next(records, (1, []))[1]
    for line, cells in records:
        if len(cells) != len(header):
            raise FormatError(
                f"{path}:{line}: {len(cells)} cells, {'more' if len(cells) > len(header) else 'fewer'} "
                f"than the header's {len(header)} columns"
            )
        if any(cells):
            yield line, dict(zip(header, cells))


def header(path: Path, delimiter: str) -> list[str]:
    """The column names of a CSV or TSV file (its first record)."""
    return next(_records(path, delimiter), (1, []))[1]


def _records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        lines = _Lines(f)
        if delimiter == "\t":
            yield from _tsv(path, lines)
            return
        reader = csv.reader(lines, delimiter=delimiter)
        while True:
            start = lines.start()
            cells = next(reader, None)
            if cells is None:
                return
            if cells not in ([], [""]):
                yield start, cells


def _tsv(path: Path, lines: _Lines) -> Iterator[tuple[int, list[str]]]:
    """A TSV's records, each read as its file's kind (the module docstring)."""
    quoted: tuple[int, int] | None = None  # the first quoted record's lines, once one decided
    bare: int | None = None  # the first line holding a bare quote, once one decided
    width = None  # the header's cells
    while True:
        start = lines.start()
        first = next(lines, None)
        if first is None:
            return
        if '"' not in first or bare is not None:
            cells = first.rstrip("\r\n").split("\t")
            if bare is not None and (len(cells) != width or '"' in first and _quoted_line(first)):
                _refuse_quoted_cell(path, start, bare, width)
        else:
            cells = _quoted_cells(first, lines)
            if cells is not None and _as_written_by_csv(cells, "".join(lines.taken)):
                quoted = quoted or (start, lines.line)
            elif quoted is not None:
                raise FormatError(
                    f"{path}:{start}: a bare quote in a cell (as GLUE's files hold), but a cell opens "
                    f"a quote on line {quoted[0]} and closes it on line {quoted[1]} ({QUOTING}); "
                    f"{ONE_WAY}"
                )
            else:
                lines.rewind()
                bare, cells = start, first.rstrip("\r\n").split("\t")
        width = len(cells) if width is None else width
        if cells not in ([], [""]):
            yield start, cells


def _quoted_cells(first: str, lines) -> list[str] | None:
    """The record that starts with `first` read as the csv module quotes it; None: a quote still open at the end."""
    try:
        return next(csv.reader(itertools.chain([first], lines), delimiter="\t"))
    except csv.Error:
        return None


def _quoted_line(line: str) -> bool:
    """Whether `line` alone is a record as the csv module quotes it (a quoted cell with doubled quotes)."""
    cells = next(csv.reader([line], delimiter="\t"), None)
    return cells is not None and _as_written_by_csv(cells, line)


def _refuse_quoted_cell(path: Path, line: int, bare: int, width: int, back: int = 20) -> None:
    """Refuse a line of a TSV read as written whose cells are off because it is part of a record quoted as the csv
    module quotes it (starting at most `back` lines before); return if there is none."""
    with open(path, encoding="utf-8", newline="") as f:
        top = max(2, line - back)  # never the header
        rest = list(itertools.islice(f, top - 1, None))
    for start in range(line, top - 1, -1):
        if '"' not in rest[start - top]:
            continue
        lines = _Lines(iter(rest[start - top :]))
        cells = _quoted_cells(next(lines), lines)
        end = start + lines.line - 1
        if (
            cells is not None
            and len(cells) == width
            and end >= line
            and _as_written_by_csv(cells, "".join(lines.taken))
        ):
            raise FormatError(
                f"{path}:{line}: a cell opens a quote on line {start} and closes it on line {end} "
                f"({QUOTING}), but line {bare} holds a bare quote (as GLUE's files do), so cells are "
                f"taken as written; {ONE_WAY}"
            )


def _as_written_by_csv(cells: list[str], raw: str) -> bool:
    """Whether `raw` is what Python's csv module writes for the record `cells` (a TSV that quotes its cells)."""
    end = "\r\n" if raw.endswith("\r\n") else "\n"
    out = io.StringIO()
    csv.writer(out, delimiter="\t", lineterminator=end).writerow(cells)
    return out.getvalue() == (raw if raw.endswith(end) else raw + end)
