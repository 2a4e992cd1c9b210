"""``pskd-store verify``: read back everything a run or a store holds, and say what is wrong."""

from __future__ import annotations

import json
import sys

import click

from pskd_store.store import StoreError


@click.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(path: str, as_json: bool) -> None:
    """Check PATH (a run directory, a store path or an fsspec URL) and exit 1 if anything
    is damaged.

    \b
    Checks every chunk of every kept teacher epoch and of the trajectory tier against its
    crc32c checksum (a missing chunk is damage), every teacher row (finite, non-negative,
    summing to 1) against its trajectory record, the labels against the store's
    fingerprint, the list of sealed epochs, the memory-map cache against its checksums and
    the store, and, for a run directory, its checkpoint, config.json and metrics.jsonl.
    Problems are named by epoch and row range. Nothing is written.
    """
    from pskd_store.run_directory import RunError
    from pskd_store.verify import verify_path

    try:
        report = verify_path(path, progress=not as_json and sys.stderr.isatty())
    except (StoreError, RunError, OSError) as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for finding in report.findings:
            click.echo(f"DAMAGED  {finding}")
        click.echo("".join(f"SKIPPED  {skipped}\n" for skipped in report.skipped), nl=False)
        click.echo(f"{'ok' if report.ok else f'{len(report.findings)} problem(s)'}: checked "
                   f"{len(report.checked)} parts of {report.target} in {report.seconds:.2f} s")
    if not report.ok:
        sys.exit(1)
