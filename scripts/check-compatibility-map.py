#!/usr/bin/env python3
"""Checks that every row of docs/compatibility.md names the tests that prove it, and that each
test named exists.

Every table must have a last column headed `test`. Each row's cell in it holds one or more
references, separated by `<br>` (each may be in backticks):

  tests/e2e/test_x.py::test_name            a pytest function (`test_name[param]` names the
                                            function `test_name`; `Class::test_name` a method)
  crates/<crate>/tests/<file>.rs::name      a Rust test function
  crates/<crate>/src/<file>.rs::tests::name a Rust test function in module `tests`

A Python reference exists when the file exists and has `def test_name` (and `class Class` for a
method); a Rust one when the file exists, has the modules named (`mod tests`) and `fn name`
marked `#[test]` or `#[tokio::test]`.

Exit status 0 when every row has references and all exist; 1 otherwise, listing each row that
has none and each reference that does not resolve. Standard library only; runs from anywhere.

  scripts/check-compatibility-map.py [path/to/compatibility.md]
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "compatibility.md"

PY_REF = re.compile(r"^(tests/[\w./-]+\.py)::([A-Za-z_]\w*(?:::[A-Za-z_]\w*)*)(\[[^\]]*\])?$")
RS_REF = re.compile(r"^(crates/[\w./-]+\.rs)::([A-Za-z_]\w*(?:::[A-Za-z_]\w*)*)$")
TEST_ATTR = re.compile(r"#\[\s*(?:tokio::)?test\b")


def split_cells(line):
    """The cells of a Markdown table row (a `\\|` inside a cell is not a separator)."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def is_separator(cells):
    return all(re.fullmatch(r":?-+:?", c) for c in cells)


def tables(text):
    """Yields (section, header line number, header cells, [(line number, cells)]) per table."""
    section, lines = None, text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.lstrip().startswith("|") and i + 1 < len(lines) and is_separator(split_cells(lines[i + 1])):
            header, rows, j = split_cells(line), [], i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append((j + 1, split_cells(lines[j])))
                j += 1
            yield section, i + 1, header, rows
            i = j
            continue
        i += 1


def references(cell):
    """The references in a test cell, and any text there that is not one."""
    refs, junk = [], []
    for part in re.split(r"<br\s*/?>|,", cell):
        part = part.strip()
        if not part:
            continue
        for token in part.split():
            token = token.strip("`")
            if token:
                (refs if PY_REF.match(token) or RS_REF.match(token) else junk).append(token)
    return refs, junk


_cache = {}


def read(path):
    if path not in _cache:
        p = ROOT / path
        _cache[path] = p.read_text(encoding="utf-8") if p.is_file() else None
    return _cache[path]


def check_python(ref):
    m = PY_REF.match(ref)
    path, names = m.group(1), m.group(2).split("::")
    text = read(path)
    if text is None:
        return f"no file {path}"
    *classes, func = names
    for c in classes:
        if not re.search(rf"^\s*class\s+{re.escape(c)}\b", text, re.M):
            return f"no class {c} in {path}"
    if not func.startswith("test"):
        return f"{func} is not a test function name (pytest collects test*)"
    if not re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(func)}\s*\(", text, re.M):
        return f"no def {func} in {path}"
    return None


def check_rust(ref):
    m = RS_REF.match(ref)
    path, names = m.group(1), m.group(2).split("::")
    text = read(path)
    if text is None:
        return f"no file {path}"
    *modules, func = names
    for mod in modules:
        if not re.search(rf"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+{re.escape(mod)}\s*\{{", text, re.M):
            return f"no mod {mod} in {path}"
    found = False
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if re.search(rf"^\s*(?:pub\s+)?(?:async\s+)?fn\s+{re.escape(func)}\s*[<(]", line):
            found = True
            # Its attributes: the lines just above, past doc comments and other attributes.
            k = i - 1
            while k >= 0 and (lines[k].strip().startswith(("#[", "///", "//")) or not lines[k].strip()):
                if TEST_ATTR.search(lines[k]):
                    return None
                k -= 1
    return f"fn {func} in {path} is not marked #[test]" if found else f"no fn {func} in {path}"


def main(argv):
    doc = Path(argv[1]) if len(argv) > 1 else DOC
    text = doc.read_text(encoding="utf-8")
    problems, n_tables, n_rows, n_refs, seen = [], 0, 0, 0, set()
    for section, header_line, header, rows in tables(text):
        n_tables += 1
        if not header or header[-1].lower() != "test":
            problems.append(f"{doc.name}:{header_line} [{section}]: the table has no last column 'test'")
            continue
        for line_no, cells in rows:
            n_rows += 1
            situation = cells[0] if cells else "?"
            where = f"{doc.name}:{line_no} [{section}] {situation[:70]!r}"
            if len(cells) != len(header):
                problems.append(f"{where}: {len(cells)} cells for {len(header)} columns (an unescaped | ?)")
                continue
            refs, junk = references(cells[-1])
            for j in junk:
                problems.append(f"{where}: not a test reference: {j!r}")
            if not refs:
                problems.append(f"{where}: no test reference")
                continue
            for ref in refs:
                n_refs += 1
                seen.add(ref)
                why = check_python(ref) if ref.endswith(".py") or ".py::" in ref else check_rust(ref)
                if why:
                    problems.append(f"{where}: {ref}: {why}")
    if n_tables == 0:
        problems.append(f"{doc}: no tables found")
    e2e = sum(1 for r in seen if r.startswith("tests/"))
    print(f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}: {n_tables} tables, {n_rows} rows, "
          f"{n_refs} test references ({len(seen)} distinct: {e2e} end-to-end, {len(seen) - e2e} Rust)")
    if problems:
        print(f"FAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print("OK: every row names at least one test, and every test named exists")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
