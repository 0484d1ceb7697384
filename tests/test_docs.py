"""docs/reliability.md promises a test per row: every test it names must exist."""
import ast
import re

from tests.conftest import REPO

DOC = REPO / "docs" / "reliability.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def _rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if re.match(r"^\| \d+ \|", line)]


def test_rows_are_numbered_in_order_and_each_names_a_test():
    rows = _rows()
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(TEST_REF.search(r) for r in rows), [r[:80] for r in rows if not TEST_REF.search(r)]


def test_every_named_test_exists():
    missing = []
    for path, name in sorted({m for r in _rows() for m in TEST_REF.findall(r)}):
        f = REPO / path
        defined = f.is_file() and any(isinstance(n, ast.FunctionDef) and n.name == name
                                      for n in ast.walk(ast.parse(f.read_text())))
        if not defined:
            missing.append(f"{path}::{name}")
    assert not missing, missing
