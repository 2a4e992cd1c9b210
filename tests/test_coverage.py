"""Every line of pskd_store/ runs under this CPU suite, or is listed with the reason it cannot.

Paths that run only on an accelerator are driven through a stand-in (test_device_paths.py);
what still needs a real GPU, NCCL or several devices is listed, line by line with its
reason, in ``gpu_only_lines.txt``. This test runs last, on the coverage the whole suite
measured (README's test command: ``--cov=pskd_store``, subprocesses, torchrun ranks and
DataLoader workers included), and fails naming each line that ran nowhere and is not
listed — and each listed line that did run (the list must not hide covered lines).
"""

from __future__ import annotations

from pathlib import Path

import coverage
import coverage.exceptions
import pytest
from coverage import CoverageData

ROOT = Path(__file__).resolve().parents[1]
LISTED = Path(__file__).with_name("gpu_only_lines.txt")


def listed_lines() -> dict[tuple[str, str], str]:
    """(file, stripped source line) -> why no CPU test can run it."""
    listed = {}
    for number, line in enumerate(LISTED.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        path, source, reason = (field.strip() for field in line.split(" | "))
        assert reason, f"{LISTED.name}:{number} gives no reason"
        listed[path, source] = reason
    return listed


def measured(live: coverage.Coverage) -> CoverageData:
    """This process's lines so far and every subprocess's data file (a process the tests
    killed with SIGKILL may have left its file unwritable: its lines count for nothing)."""
    data = CoverageData(no_disk=True)
    data.update(live.get_data())
    data_file = Path(live.config.data_file).resolve()
    for part in data_file.parent.glob(data_file.name + ".*"):
        other = CoverageData(basename=str(part))
        try:
            other.read()
        except coverage.exceptions.DataError:
            continue
        data.update(other)
    return data


def whole_suite_ran(session: pytest.Session) -> bool:
    tests = {Path(item.path) for item in session.items}
    return not session.config.option.keyword and not session.config.option.markexpr and tests == set(
        Path(__file__).parent.glob("test_*.py"))


@pytest.mark.runs_last
def test_every_line_runs_on_the_cpu_or_is_listed_with_its_reason(request):
    live = coverage.Coverage.current()
    if live is None:
        pytest.skip("coverage is not being measured: run README's test command (pytest --cov=pskd_store)")
    if not whole_suite_ran(request.session):
        pytest.skip("runs on the whole suite's coverage only")
    data = measured(live)
    analyser = coverage.Coverage(data_file=None, config_file=str(ROOT / "pyproject.toml"))
    listed = listed_lines()
    unlisted, stale, found = [], [], set()
    for path in sorted((ROOT / "pskd_store").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        _, statements, _, _, _ = analyser.analysis2(str(path))
        ran = set(data.lines(str(path)) or ())
        source = path.read_text().splitlines()
        for number in statements:
            line = source[number - 1].strip()
            found.add((name, line))
            if number not in ran and (name, line) not in listed:
                unlisted.append(f"{name}:{number}: {line}")
            if number in ran and (name, line) in listed:
                stale.append(f"{name}:{number}: {line} (listed as: {listed[name, line]})")
    assert not unlisted, "lines no test runs; drive them through a stand-in or list them with a reason in " \
        f"{LISTED.name}:\n" + "\n".join(unlisted)
    stale += [f"{name}: {line} (no such statement)" for name, line in listed if (name, line) not in found]
    assert not stale, f"lines listed in {LISTED.name} that a test does run, or that are gone; unlist them:\n" + \
        "\n".join(stale)
