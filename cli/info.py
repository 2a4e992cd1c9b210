"""``pskd-store info``: what a store holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pskd_store.errors import os_problem
from pskd_store.run_directory import RunDirectory
from pskd_store.store import SoftTargetStore, StoreError


def resolve_store(path: str) -> str:
    """A run directory stands for its store; anything else is the store itself."""
    run = RunDirectory(Path(path))
    return run.store_url() if "://" not in path and run.is_run() else path


@click.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_command(store: str, as_json: bool) -> None:
    """Print the summary of STORE (a store path, fsspec URL or run directory): what its
    metadata says. It reads no chunk: `pskd-store verify` checks the data itself."""
    try:
        summary = SoftTargetStore.open(resolve_store(store), read_only=True).summary()
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:  # permission denied, say
        raise click.ClickException(f"cannot read {store}: {os_problem(err, store)}") from err
    if as_json:
        click.echo(json.dumps({**summary, "checked": "metadata only: no chunk read (pskd-store verify reads them)"},
                              indent=2))
        return
    click.echo(f"store        {summary['url']}")
    if summary["num_sequences"] is None:
        click.echo(f"samples      N={summary['num_samples']}  classes K={summary['num_classes']}")
    else:
        click.echo(f"sequences    {summary['num_sequences']}, a row per target token: N={summary['num_samples']} rows  "
                   f"vocabulary K={summary['num_classes']}  (trajectory: per sequence)")
    click.echo(f"storage      {summary['rows']} rows, {summary['chunk_rows']} per chunk, blosc {summary['blosc']}")
    click.echo(f"sealed       {summary['sealed_epochs'] or 'none'}  (teacher kept: {summary['teacher_epochs']})")
    click.echo("checked      metadata only, no chunk read: `pskd-store verify` checks every chunk and row")
    for epoch, info in summary["epochs"].items():
        stored, raw = info["nbytes_stored"], info["nbytes"]
        kept = "" if epoch in summary["teacher_epochs"] else "  (pruned; trajectory kept)"
        click.echo(
            f"  epoch {epoch:4d}  {stored / 2**20:8.2f} MiB ({raw / max(stored, 1):.2f}x)  "
            f"written {info['ids_written']}  carried {info['carried_forward']}  "
            f"duplicates {info['duplicates']}{kept}"
        )
