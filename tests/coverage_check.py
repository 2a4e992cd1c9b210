"""Every line of pskd_store/ runs under this CPU suite, or is listed with the reason it cannot.

Paths that run only on an accelerator are driven through a stand-in (test_device_paths.py);
what still needs a real GPU, NCCL or several devices is listed, line by line with its
reason, in ``gpu_only_lines.txt``. After the whole suite ran under README's test command
(``--cov=pskd_store``: subprocesses, torchrun ranks, DataLoader workers and pytest-xdist's
workers included), this plugin reads the coverage pytest-cov combined and fails the run
naming each line that ran nowhere and is not listed — and each listed line that did run
(the list must not hide covered lines). It is a session hook, not a test: with ``-n 2``
no test runs after every worker has finished, and only the controller sees all workers' data.
"""

from __future__ import annotations

from pathlib import Path

import coverage
import pytest
from coverage import CoverageData

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).parent
LISTED = TESTS / "gpu_only_lines.txt"


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


def statements() -> dict[Path, list[int]]:
    """Each file of pskd_store/ and the numbers of its statement lines, as coverage counts them."""
    analyser = coverage.Coverage(data_file=None, config_file=str(ROOT / "pyproject.toml"))
    return {path: analyser.analysis2(str(path))[1] for path in sorted((ROOT / "pskd_store").rglob("*.py"))}


def problems(data: CoverageData, listed: dict[tuple[str, str], str]) -> list[str]:
    """The unrun, unlisted lines and the listed lines that ran or are gone, as messages."""
    unlisted, stale, found = [], [], set()
    for path, numbers in statements().items():
        name = path.relative_to(ROOT).as_posix()
        ran = set(data.lines(str(path)) or ())
        source = path.read_text().splitlines()
        for number in numbers:
            line = source[number - 1].strip()
            found.add((name, line))
            if number not in ran and (name, line) not in listed:
                unlisted.append(f"{name}:{number}: {line}")
            if number in ran and (name, line) in listed:
                stale.append(f"{name}:{number}: {line} (listed as: {listed[name, line]})")
    stale += [f"{name}: {line} (no such statement)" for name, line in listed if (name, line) not in found]
    messages = []
    if unlisted:
        messages.append("lines no test runs; drive them through a stand-in or list them with a reason in "
                        f"{LISTED.name}:\n" + "\n".join(unlisted))
    if stale:
        messages.append(f"lines listed in {LISTED.name} that a test does run, or that are gone; unlist them:\n"
                        + "\n".join(stale))
    return messages


def whole_suite_selected(config: pytest.Config) -> bool:
    """The run was README's: every test file, nothing deselected (the xdist controller
    collects nothing, so this reads the command line rather than the collected items)."""
    option = config.option
    paths = {(config.invocation_params.dir / arg).resolve() for arg in config.args}
    deselected = option.keyword or option.markexpr or option.deselect or getattr(option, "lf", False)
    return paths in ({TESTS}, {ROOT}) and not deselected


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session: pytest.Session):
    """Around pytest-cov's own wrapper: by now it has combined every process's data."""
    result = yield
    config = session.config
    measuring = config.pluginmanager.hasplugin("_cov") and config.option.cov_source
    if hasattr(config, "workerinput") or not measuring or not whole_suite_selected(config):
        return result
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if session.testsfailed:
        reporter.write_line("coverage check not run: tests failed, so the suite's coverage is incomplete")
        return result
    data_file = config.invocation_params.dir / coverage.Coverage(
        config_file=str(ROOT / "pyproject.toml")).config.data_file
    data = CoverageData(basename=str(data_file))
    data.read()
    listed = listed_lines()
    found = problems(data, listed)
    for message in found:
        reporter.write_line(f"\nERROR: {message}", red=True, bold=True)
    if not found:
        reporter.write_line(f"coverage check: every line of pskd_store/ ran, but the {len(listed)} "
                            f"listed in {LISTED.name}")
    session.testsfailed += bool(found)
    return result
