"""``pskd-store eval``: test metrics of one model or of the average of several."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pskd_store.run_directory import RunDirectory, RunError, writing
from pskd_store.store import StoreError


def checkpoint_path(path: str) -> Path:
    """A run directory stands for its last checkpoint (whether or not it wrote one yet)."""
    run = RunDirectory(Path(path))
    return run.checkpoint if run.checkpoint.is_file() or run.config.is_file() else Path(path)


@click.command("eval")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the data set is, if not where the run found it (for every model of an ensemble).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="The data set's test split, or the validation split the runs held out (--val-split).")
@click.option("--ece-bins", type=click.IntRange(min=1), default=None,
              help="ECE's number of bins. Default: the first run's --ece-bins (10, the paper's, unless set).")
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write per-sample probabilities (.npz); default RUN/eval/<split>_probs.npz "
                   "of the first run (<checkpoint>_<split>_probs.npz for a checkpoint other than the "
                   "run's last, ensemble_<split>_probs.npz for several models), or beside a checkpoint "
                   "that is in no run directory.")
def eval_command(checkpoints: tuple[str, ...], data_dir: str | None, split: str, ece_bins: int | None,
                 device: str, output: str | None) -> None:
    """Evaluate CHECKPOINTS (run directories or .pt files) on the test split (or --split val).

    Several checkpoints are an ensemble: their softmax outputs are averaged, as in the
    paper's ensemble results. Prints top-1/top-5 error, NLL, ECE and AURC/E-AURC as JSON and
    writes the per-sample probabilities that `pskd-store inspect` draws the reliability
    diagram from.
    """
    from pskd_store.evaluation import evaluate_checkpoints

    paths = [checkpoint_path(p) for p in checkpoints]
    run = RunDirectory(paths[0].parent.parent)
    try:
        if output is not None:  # refused before the evaluation, not after it
            run.require_room_for_probabilities(Path(output))
        metrics, predictions = evaluate_checkpoints(paths, split=split, data_dir=data_dir,
                                                    device=device, ece_bins=ece_bins)
    except (ValueError, OSError, StoreError) as err:  # each names its file and the fix (RunError is one)
        raise click.ClickException(str(err)) from err
    if output is None and not run.config.is_file():  # a checkpoint outside its run: beside it
        output = paths[0].with_name(f"{paths[0].stem}_{run.eval_probs(split, len(paths) > 1).name}")
    elif output is None:
        output = run.eval_probs(split, ensemble=len(paths) > 1)
        if len(paths) == 1 and paths[0] != run.checkpoint:  # inspect's test_probs.npz stays the final model's
            output = output.with_name(f"{paths[0].stem}_{output.name}")
    output = Path(output)
    try:
        with writing(output, then="evaluate again (or pass --output elsewhere)"):
            run.write_eval_probs(*predictions, sources=[str(p) for p in paths], path=output)
    except RunError as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps({"checkpoints": [str(p) for p in paths], "split": split, **metrics,
                           "probs": str(output)}, indent=2))
