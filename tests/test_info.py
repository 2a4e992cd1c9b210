"""`pskd-store info` on a real store (the console script once, then the same command
in-process), and `pskd-store --help`: the commands that need no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import pskd, pskd_in_process
from store_helpers import make_labels, write_epoch

from pskd_store.cli.main import COMMANDS, cli
from pskd_store.store import SoftTargetStore


@pytest.mark.slow
def test_info_prints_the_store_summary(tmp_path):
    store = SoftTargetStore.create(tmp_path / "run" / "store", make_labels(120, 6), 6, keep_epochs=1, chunk_rows=32)
    for epoch in (1, 2):
        write_epoch(store, epoch, ids=np.arange(100))
    text = pskd("info", str(tmp_path / "run")).stdout
    assert "N=120  classes K=6" in text and "sealed       [1, 2]  (teacher kept: [2])" in text
    assert "carried 20" in text and "(pruned; trajectory kept)" in text

    summary = json.loads(pskd_in_process("info", "--json", store.url).stdout)
    assert summary["sealed_epochs"] == [1, 2] and summary["epochs"]["2"]["ids_written"] == 100

    missing = pskd_in_process("info", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no pskd-store at" in missing.stderr


def test_the_command_line_runs_as_a_module_as_torchrun_m_runs_it(tmp_path):
    store = SoftTargetStore.create(tmp_path / "store", make_labels(20, 3), 3)
    shown = subprocess.run([sys.executable, "-m", "pskd_store.cli.main", "info", str(store.url)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "samples      N=20  classes K=3" in shown.stdout, shown.stdout + shown.stderr


def test_help_lists_every_subcommand_without_importing_one():
    """A newcomer's first command: it imports no subcommand, hence no torch (seconds)."""
    script = """
import sys
from pskd_store.cli.main import cli
cli(["--help"], standalone_mode=False)
print(sorted(name for name in sys.modules if name == "torch" or name.startswith("pskd_store.cli.")))
"""
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    *listing, imported = shown.stdout.strip().splitlines()
    assert imported == "['pskd_store.cli.main']"
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name:<9}{summary}" in listing
        assert cli.get_command(None, name).name == name  # each entry is the command of that name
