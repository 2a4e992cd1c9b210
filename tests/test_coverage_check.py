"""The coverage check's rules, on coverage data made here (the check itself runs after the
whole suite, where a wrong rule would pass or fail every run unnoticed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from coverage import CoverageData
from coverage_check import LISTED, ROOT, TESTS, listed_lines, problems, statements, whole_suite_selected

pytest_plugins = ["pytester"]


def data_of(ran: dict[Path, list[int]]) -> CoverageData:
    data = CoverageData(no_disk=True)
    data.add_lines({str(path): set(lines) for path, lines in ran.items()})
    return data


def test_every_line_but_the_listed_ones_passes_and_any_other_gap_is_named():
    listed = listed_lines()
    ran = statements()
    for path, lines in ran.items():
        name, source = path.relative_to(ROOT).as_posix(), path.read_text().splitlines()
        ran[path] = [n for n in lines if (name, source[n - 1].strip()) not in listed]
    assert problems(data_of(ran), listed) == []

    store = ROOT / "pskd_store" / "store.py"
    missed = ran[store].pop(len(ran[store]) // 2)
    (message,) = problems(data_of(ran), listed)
    assert message.startswith("lines no test runs") and message.endswith(
        f"pskd_store/store.py:{missed}: " + store.read_text().splitlines()[missed - 1].strip())


def test_a_listed_line_that_runs_or_is_gone_is_named():
    listed = listed_lines()
    (message,) = problems(data_of(statements()), listed)  # every line ran, the listed ones too
    assert message.startswith(f"lines listed in {LISTED.name} that a test does run")
    assert all(source in message for _, source in listed) and "no such statement" not in message
    ran = {path: [] for path in statements()}
    gone = {**listed, ("pskd_store/store.py", "return nothing_here"): "a line that is not there"}
    assert [m for m in problems(data_of(ran), gone) if "no such statement" in m][0].endswith(
        "pskd_store/store.py: return nothing_here (no such statement)")


@pytest.mark.parametrize("args, whole", [
    ([str(TESTS)], True), ([str(ROOT)], True), ([str(TESTS / "test_store.py")], False),
    (["-m", "not slow"], False), (["-k", "store"], False), (["--deselect", "tests/test_store.py::x"], False),
])
def test_only_the_whole_suite_is_checked(pytester: pytest.Pytester, args, whole):
    paths = args if any(a.startswith("/") for a in args) else [*args, str(TESTS)]
    assert whole_suite_selected(pytester.parseconfig(*paths)) is whole
