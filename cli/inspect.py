"""``pskd-store inspect``: hard samples, prediction trajectories, calibration and training
curves of one or more runs, read from their stores' trajectory tier and metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from pskd_store.analysis import RunError, RunRecord, check_ids, check_same_samples, hard_samples, load_run, summarize
from pskd_store.plots import plot_reliability, plot_training_curves, plot_trajectories

# (key in the test metrics, label, format) for the text summary, in the paper's units.
TEST_METRICS = (
    ("top1_err", "top-1 err", "{:.2f}%"),
    ("top5_err", "top-5 err", "{:.2f}%"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE", "{:.2f}%"),
    ("aurc", "AURC", "{:.2f}"),
    ("eaurc", "E-AURC", "{:.2f}"),
)


def _parse_ids(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """``--ids 1,5,9`` as a list of ints (range is checked once the store's N is known)."""
    if value is None:
        return None
    try:
        ids = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as err:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of sample ids, e.g. 1,5,9") from err
    if not ids:
        raise click.BadParameter("give at least one sample id, e.g. --ids 1,5,9")
    return ids


def _choose_ids(
    first: RunRecord, ids: list[int] | None, top: int, max_correct_fraction: float
) -> tuple[np.ndarray, str]:
    """The samples to plot in every run, and a title saying how they were chosen."""
    if ids is not None:
        shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
        return check_ids(ids, first.num_samples, first.path), f"samples {shown}"
    chosen = hard_samples(first.trajectory, first.labels, top, max_correct_fraction)
    return chosen, (
        f"{len(chosen)} hardest samples of {first.name} "
        f"(right in < {max_correct_fraction:.0%} of the epochs that predicted them)"
    )


def _write_plots(runs: list[RunRecord], ids: np.ndarray, title: str, out: Path) -> list[Path]:
    """Every figure the runs have data for; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if len(ids):
        files.append(plot_trajectories(runs, ids, out / "trajectories.png", title))
    for index, run in enumerate(runs, start=1):
        if run.eval_probs is not None:
            files.append(plot_reliability(run, out / f"reliability_{index}_{run.path.name}.png"))
    with_metrics = [run for run in runs if run.metrics]
    if with_metrics:
        files.append(plot_training_curves(with_metrics, out / "training_curves.png"))
    return files


def _echo_summary(summary: dict[str, Any], chosen_how: str) -> None:
    click.echo(f"{summary['name']}  [{summary['run']}]")
    click.echo(f"  epochs        {summary['epochs']}   (N={summary['num_samples']} samples)")
    click.echo(
        f"  hard samples  {summary['hard_found']} found (right in < {summary['max_correct_fraction']:.0%} "
        "of the epochs that predicted them)"
    )
    mean = summary["mean_final_true_prob"]
    click.echo(
        f"  plotted       {summary['plotted']} samples ({chosen_how})"
        + ("" if mean is None else f", mean final true-class prob {mean:.3f}")
    )
    kept = summary["teacher_epochs_kept"]
    pruned = "; the others pruned, their trajectories kept" if len(kept) < summary["epochs"] else ""
    click.echo(
        f"  store         {summary['store_mib_per_epoch']:.3f} MiB per epoch, "
        f"{summary['store_mib_total']:.3f} MiB written over {summary['epochs']} epochs, "
        f"{summary['store_mib_kept']:.3f} MiB of it kept (teacher epochs {kept}{pruned})"
    )
    test = summary["final_test"]
    if test is not None:
        values = "  ".join(f"{label} {fmt.format(test[key])}" for key, label, fmt in TEST_METRICS if key in test)
        click.echo(f"  final test    epoch {test['epoch']}: {values}")
    if summary["eval_ece"] is not None:
        click.echo(f"  eval ECE      {summary['eval_ece']:.2f}%")


@click.command("inspect")
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--top", default=100, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Plot the N hardest samples of the first run.")
@click.option("--ids", callback=_parse_ids, metavar="ID,ID,...",
              help="Plot these sample ids (e.g. 1,5,9) instead of the hardest samples.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the PNG files [default: RUN/inspect of the first run].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary numbers as JSON (one object, one entry per run) instead of text.")
@click.option("--max-correct-fraction", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="A sample is hard when it was right in fewer than this fraction of the epochs that "
                   "predicted it (the epochs whose training pass wrote its row, not carried it forward).")
def inspect_command(
    runs: tuple[str, ...], top: int, ids: list[int] | None, out: Path | None, as_json: bool,
    max_correct_fraction: float,
) -> None:
    """Plot what the stores of training runs remember about their samples.

    Each RUN is a directory written by `pskd-store train`. Only the store's compact
    trajectory tier (true-class probability, max probability and predicted class of
    every sample at every epoch) is read, never the full predictions, so this is fast
    on stores with many epochs; nothing in RUN is changed except the --out directory.

    Hard samples follow the PS-KD paper (Figure 2): training samples predicted correctly
    in fewer than --max-correct-fraction of the epochs that predicted them, hardest first
    (the smallest fraction right, then the lowest final true-class probability). With several runs, the hard
    samples are chosen on the FIRST run (e.g. the cross-entropy baseline) and the same
    ids are plotted for every run; all runs must hold the same training samples.

    \b
    Files written to --out:
      trajectories.png         per run, true-class and max probability of the plotted
                               samples over epochs (thin: samples, bold: mean)
      reliability_I_RUN.png    reliability diagram of each run's final test
                               probabilities, RUN/eval/test_probs.npz (written by
                               train; `pskd-store eval` overwrites it)
      training_curves.png      alpha_t, train loss, test error, NLL and ECE per
                               epoch from RUN/metrics.jsonl, the runs overlaid

    \b
    Examples:
      pskd-store inspect runs/ce
      pskd-store inspect runs/ce runs/pskd --top 20
      pskd-store inspect runs/pskd --ids 1,5,9 --out /tmp/plots --json
    """
    try:
        loaded = [load_run(path) for path in runs]
        for other in loaded[1:]:
            check_same_samples(loaded[0], other)
        chosen, title = _choose_ids(loaded[0], ids, top, max_correct_fraction)
    except RunError as err:
        raise click.ClickException(str(err)) from err
    out = out if out is not None else loaded[0].path / "inspect"
    try:
        files = _write_plots(loaded, chosen, title, out)
    except OSError as err:
        raise click.ClickException(f"cannot write the plots to {out} ({err}): pass a writable --out") from err
    summaries = [summarize(run, chosen, max_correct_fraction) for run in loaded]
    if as_json:
        selection = "ids" if ids is not None else "hard"
        report = {"selection": selection, "runs": summaries, "files": [str(f) for f in files]}
        click.echo(json.dumps(report, indent=2))
        return
    chosen_how = "chosen with --ids" if ids is not None else f"hardest of {loaded[0].name}"
    for summary in summaries:
        _echo_summary(summary, chosen_how)
    if not len(chosen):
        click.echo("no hard samples in the first run: no trajectories plotted (try a higher --max-correct-fraction)")
    click.echo("wrote" if files else "wrote no plots")
    for path in files:
        click.echo(f"  {path}")
