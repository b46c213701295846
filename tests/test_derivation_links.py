"""The derivations' tables must name things that exist, so the docs cannot rot.

Every ``derivations/<family>.md`` except ``README.md`` opens with a Markdown table

    | tag | equation | reference | native | test |

and this module checks, for every row:

* ``tag`` is ``<FAMILY>.<n>`` (capitals), unique, one prefix per file and per family
  (by convention the file stem in capitals: ``gan.md`` -> ``GAN.n``);
* every ``reference`` name (``, ``-separated) is an attribute of
  ``genloss.reference.<family>`` (the family module is the file stem);
* every ``native`` name (``, ``-separated, or ``—`` for none) appears in some file
  under ``cpp/`` or ``cuda/`` as ``struct <Name>`` (or ``class <Name>``), ``<Name>(``
  or ``<Name><``;
* every ``test`` entry (``, ``-separated) is ``tests/<file>.py::<function>`` where the
  file exists and defines ``def <function>``.

Finally, every tag cited as ``(FAMILY.n)`` in the reference code
(``python/genloss/reference/*.py``) must be a row of some table; the same is checked
for the native and torch code (``cpp/``, ``cuda/``, ``python/genloss``).

Paths are taken from this file's location (``<root>/tests/``), not the working
directory.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DERIVATIONS = ROOT / "derivations"
COLUMNS = ["tag", "equation", "reference", "native", "test"]
NONE_MARKERS = {"—", "-", "–", ""}
NATIVE_DIRS = ("cpp", "cuda")
SOURCE_SUFFIXES = {".h", ".hpp", ".hh", ".cuh", ".c", ".cc", ".cpp", ".cxx", ".cu", ".inl", ".inc"}
TAG_CITATION = re.compile(r"\(([A-Z][A-Z0-9]*\.\d+)\)")

try:  # the tests normally run with PYTHONPATH=python; fall back to the source tree
    import genloss  # noqa: F401
except ImportError:  # pragma: no cover - depends on how pytest is invoked
    sys.path.insert(0, str(ROOT / "python"))


@dataclass(frozen=True)
class Row:
    file: str
    line: int
    tag: str
    equation: str
    reference: tuple[str, ...]
    native: tuple[str, ...]
    test: tuple[str, ...]

    def where(self) -> str:
        return f"derivations/{self.file}:{self.line} ({self.tag})"


def _table_files() -> list[Path]:
    return sorted(p for p in DERIVATIONS.glob("*.md") if p.name != "README.md")


def _cells(line: str) -> list[str]:
    """Split a table row on unescaped pipes; strip the outer empty cells."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if parts and parts[-1].strip() == "":
        parts = parts[:-1]
    return [p.strip() for p in parts]


def _names(cell: str) -> tuple[str, ...]:
    cell = cell.strip()
    if cell in NONE_MARKERS:
        return ()
    return tuple(n.strip().strip("`").strip() for n in cell.split(",") if n.strip().strip("`").strip())


@cache
def parse_table(path: Path) -> tuple[Row, ...]:
    """The opening table of a derivation file; ValueError if it is missing or malformed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or not lines[i].lstrip().startswith("|"):
        raise ValueError(f"{path.name} must open with the table | {' | '.join(COLUMNS)} |")
    header = [c.lower() for c in _cells(lines[i])]
    if header != COLUMNS:
        raise ValueError(f"{path.name}:{i + 1}: table header must be {COLUMNS}, got {header}")
    if i + 1 >= len(lines) or not re.fullmatch(
        r"\|?(\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*\|?", lines[i + 1].strip()
    ):
        raise ValueError(f"{path.name}:{i + 2}: expected the |---|---|... separator row")
    rows = []
    for j in range(i + 2, len(lines)):
        line = lines[j]
        if not line.lstrip().startswith("|"):
            break
        cells = _cells(line)
        if len(cells) < len(COLUMNS):
            raise ValueError(
                f"{path.name}:{j + 1}: expected {len(COLUMNS)} cells, got {len(cells)}: {line!r}"
            )
        # A stray pipe inside the equation would add cells: the last three are fixed.
        tag, reference, native, test = cells[0], cells[-3], cells[-2], cells[-1]
        equation = " | ".join(cells[1:-3])
        rows.append(Row(path.name, j + 1, tag, equation, _names(reference), _names(native), _names(test)))
    if not rows:
        raise ValueError(f"{path.name}: the table has no rows")
    return tuple(rows)


def _all_rows() -> list[Row]:
    rows: list[Row] = []
    for p in _table_files():
        rows.extend(parse_table(p))
    return rows


@cache
def _native_sources() -> tuple[tuple[str, str], ...]:
    out = []
    for d in NATIVE_DIRS:
        base = ROOT / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix in SOURCE_SUFFIXES:
                out.append((str(p.relative_to(ROOT)), p.read_text(encoding="utf-8", errors="replace")))
    return tuple(out)


def _native_defined(name: str) -> bool:
    n = re.escape(name)
    pattern = re.compile(rf"\b(?:struct|class)\s+{n}\b|\b{n}\s*\(|\b{n}\s*<")
    return any(pattern.search(text) for _, text in _native_sources())


def _test_defined(entry: str) -> str | None:
    """None if ``tests/<file>.py::<function>`` resolves, else the reason."""
    if "::" not in entry:
        return f"{entry!r} is not of the form tests/<file>.py::<function>"
    rel, func = entry.split("::", 1)
    if not re.fullmatch(r"tests/[\w/]+\.py", rel) or not re.fullmatch(r"[A-Za-z_]\w*", func):
        return f"{entry!r} is not of the form tests/<file>.py::<function>"
    path = ROOT / rel
    if not path.is_file():
        return f"{rel} does not exist"
    if not re.search(
        rf"^\s*(?:async\s+)?def\s+{re.escape(func)}\s*\(", path.read_text(encoding="utf-8"), re.M
    ):
        return f"{rel} has no `def {func}`"
    return None


TABLE_FILES = _table_files()
IDS = [p.name for p in TABLE_FILES]


def test_there_are_derivation_tables():
    assert TABLE_FILES, f"no derivations/*.md with a table under {DERIVATIONS}"


@pytest.mark.parametrize("path", TABLE_FILES, ids=IDS)
def test_table_is_well_formed(path):
    rows = parse_table(path)  # raises with the line number on a malformed table
    problems = []
    seen = set()
    prefixes = set()
    for r in rows:
        if not re.fullmatch(r"[A-Z][A-Z0-9]*\.\d+", r.tag):
            problems.append(f"{r.where()}: tag must be <FAMILY>.<n>, FAMILY in capitals")
        prefixes.add(r.tag.split(".")[0])
        if r.tag in seen:
            problems.append(f"{r.where()}: duplicate tag")
        seen.add(r.tag)
        if not r.equation:
            problems.append(f"{r.where()}: empty equation")
        if not r.reference:
            problems.append(f"{r.where()}: no reference function")
        if not r.test:
            problems.append(f"{r.where()}: no test")
    if len(prefixes) > 1:
        problems.append(f"derivations/{path.name}: one family prefix per file, got {sorted(prefixes)}")
    others = {r.tag.split(".")[0] for p in TABLE_FILES if p != path for r in parse_table(p)}
    if prefixes & others:
        problems.append(
            f"derivations/{path.name}: prefix {sorted(prefixes & others)} is used by another file"
        )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", TABLE_FILES, ids=IDS)
def test_reference_names_resolve(path):
    module_name = f"genloss.reference.{path.stem}"
    module = importlib.import_module(module_name)
    problems = [
        f"{r.where()}: {name!r} is not an attribute of {module_name}"
        for r in parse_table(path)
        for name in r.reference
        if not hasattr(module, name)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", TABLE_FILES, ids=IDS)
def test_native_names_resolve(path):
    problems = [
        f"{r.where()}: native {name!r} is not defined under cpp/ or cuda/ "
        f"(as `struct {name}`, `{name}(` or `{name}<`)"
        for r in parse_table(path)
        for name in r.native
        if not _native_defined(name)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", TABLE_FILES, ids=IDS)
def test_test_entries_resolve(path):
    problems = []
    for r in parse_table(path):
        for entry in r.test:
            why = _test_defined(entry)
            if why:
                problems.append(f"{r.where()}: {why}")
    assert not problems, "\n".join(problems)


def _cited_tags(files) -> list[tuple[str, int, str]]:
    out = []
    for p in files:
        for k, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in TAG_CITATION.finditer(line):
                out.append((os.path.relpath(p, ROOT), k, m.group(1)))
    return out


def _dangling(files) -> list[str]:
    known = {r.tag for r in _all_rows()}
    return [
        f"{f}:{k}: cites ({tag}), which no derivations table defines"
        for f, k, tag in _cited_tags(files)
        if tag not in known
    ]


def test_tags_cited_in_reference_exist():
    files = sorted((ROOT / "python" / "genloss" / "reference").glob("*.py"))
    assert files, "no python/genloss/reference/*.py"
    problems = _dangling(files)
    assert not problems, "\n".join(problems)


def test_tags_cited_in_native_and_torch_code_exist():
    files = [
        p
        for d in (*NATIVE_DIRS, "python/genloss")
        if (ROOT / d).is_dir()
        for p in sorted((ROOT / d).rglob("*"))
        if p.is_file() and (p.suffix in SOURCE_SUFFIXES or p.suffix == ".py") and "reference" not in p.parts
    ]
    problems = _dangling(files)
    assert not problems, "\n".join(problems)


DOCS = sorted(DERIVATIONS.glob("*.md")) + sorted((ROOT / "notes").glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_control_characters(path):
    """No tab, carriage return or other control character in the Markdown: each is a LaTeX
    escape that a Python string literal ate (``"\\times"`` holds a tab, ``"\\bar"`` a
    backspace), so the rendered equation silently loses its command ("5 imes", "ar")."""
    text = path.read_bytes().decode("utf-8")
    bad = [(i + 1, repr(ch)) for i, line in enumerate(text.split("\n")) for ch in line if ch < " "]
    assert not bad, f"{path.name}: control characters at (line, char) {bad[:10]}"
