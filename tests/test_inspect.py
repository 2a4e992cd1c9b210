"""`pskd-store inspect` and its analysis on run directories built by hand.

Each run has a real store whose predictions are designed so that the hard samples, their
order and their final true-class probabilities are known in advance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pskd_store.analysis import RunRecord, check_same_samples, hard_samples, load_run
from pskd_store.cli.inspect import inspect_command
from pskd_store.metrics import evaluate
from pskd_store.plots import fit_title
from pskd_store.run_directory import RunDirectory, RunError
from pskd_store.store import SoftTargetStore

N, K, EPOCHS = 40, 4, 6
LABELS = np.arange(N) % K
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
F16_TOL = 1e-3

# id -> (correct in epochs 1..n, true-class probability at the last epoch, which is wrong).
# Ids not listed are right in every epoch with true-class probability 0.7.
CE_DESIGN = {
    7: (0, 0.10), 9: (0, 0.10),                     # never right; tie broken by id
    3: (1, 0.05), 1: (1, 0.15), 4: (1, 0.18), 0: (1, 0.20), 2: (1, 0.25),
    6: (2, 0.20),                                   # right in 2 of 6: still hard
    5: (3, 0.20),                                   # right in exactly half: not hard
}
CE_HARD = [7, 9, 3, 1, 4, 0, 2, 6]
CE_HARD_MEAN_FINAL = (0.10 + 0.10 + 0.05 + 0.15 + 0.18 + 0.20 + 0.25 + 0.20) / 8
PSKD_DESIGN = {7: (0, 0.30)}
PSKD_MEAN_FINAL_ON_CE_HARD = (7 * 0.7 + 0.30) / 8


def design_probs(epoch: int, design: dict[int, tuple[int, float]], labels: np.ndarray) -> np.ndarray:
    """(N, K) predictions of one epoch: right (0.7 on the label) or wrong (0.6 on the next class)."""
    probs = np.full((len(labels), K), 0.1, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = 0.7
    for sample, (right_epochs, final_true) in design.items():
        if epoch <= right_epochs:
            continue
        true = final_true if epoch == EPOCHS else 0.2
        wrong = (labels[sample] + 1) % K
        probs[sample] = (1 - 0.6 - true) / (K - 2)
        probs[sample, labels[sample]] = true
        probs[sample, wrong] = 0.6
    return probs


def metrics_row(epoch: int, alpha_T: float) -> dict:
    test = {"top1_err": 30.0 - epoch, "top5_err": 5.0 - 0.5 * epoch, "nll": 1.2 - 0.1 * epoch,
            "ece": 8.0 - epoch, "aurc": 90.0 - epoch, "eaurc": 40.0 - epoch, "n": 100.0}
    return {"epoch": epoch, "alpha_t": alpha_T * epoch / EPOCHS, "lr": 0.1,
            "train": {"loss": 2.0 / epoch, "top1_err": 50.0 / epoch, "samples_per_s": 1000.0, "seconds": 0.1},
            "test": test}


def make_run(root: Path, name: str, design: dict, method: str, labels: np.ndarray = LABELS,
             eval_probs: bool = False) -> Path:
    """A run directory as `pskd-store train` (and `eval`) leave it."""
    run = root / name
    run.mkdir()
    alpha_T = 0.8 if method == "pskd" else 0.0
    config = {"dataset": "mnist1d", "arch": "mlp", "method": method, "alpha_T": alpha_T, "epochs": EPOCHS}
    (run / "config.json").write_text(json.dumps(config))
    store = SoftTargetStore.create(run / "store", labels, K)
    for epoch in range(1, EPOCHS + 1):
        with store.writer(epoch, from_logits=False) as writer:
            writer.write(torch.arange(len(labels)), torch.from_numpy(design_probs(epoch, design, labels)))
        store.seal(epoch)
    rows = [metrics_row(epoch, alpha_T) for epoch in range(1, EPOCHS + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if eval_probs:
        rng = np.random.default_rng(0)
        (run / "eval").mkdir()
        np.savez(run / "eval" / "test_probs.npz", probs=rng.dirichlet(np.ones(K), 50).astype(np.float32),
                 labels=rng.integers(0, K, 50))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "ce": make_run(root, "ce", CE_DESIGN, "ce", eval_probs=True),
        "pskd": make_run(root, "pskd", PSKD_DESIGN, "pskd"),
    }


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and output; an error must be a clean exit, never an escaped exception."""
    result = CliRunner().invoke(inspect_command, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def inspect_json(*args: str) -> dict:
    code, output = invoke(*args, "--json")
    assert code == 0, output
    return json.loads(output)


def assert_pngs(files: list[str], names: set[str]) -> None:
    assert {Path(f).name for f in files} == names
    for file in files:
        data = Path(file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, file


def png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR width


def test_hard_samples_are_the_designed_ones_hardest_first(runs):
    run = load_run(runs["ce"])
    assert hard_samples(run.trajectory, run.labels).tolist() == CE_HARD
    assert hard_samples(run.trajectory, run.labels, top=3).tolist() == CE_HARD[:3]
    # right in 3 of 6 epochs is hard only once the bar is above one half
    assert 5 in hard_samples(run.trajectory, run.labels, max_correct_fraction=0.6)


def test_load_run_reads_config_metrics_eval_and_store(runs):
    run = load_run(runs["ce"])
    assert run.name == "ce/mlp (ce)" and run.num_epochs == EPOCHS and run.num_samples == N
    assert run.trajectory["epochs"].tolist() == list(range(1, EPOCHS + 1))
    assert [row["epoch"] for row in run.metrics] == list(range(1, EPOCHS + 1))
    assert run.eval_probs.shape == (50, K) and run.eval_labels.shape == (50,)
    assert load_run(runs["pskd"]).eval_probs is None


def test_json_summary_has_the_designed_numbers(runs, tmp_path):
    report = inspect_json(runs["ce"], "--out", tmp_path)
    assert report["selection"] == "hard"
    (ce,) = report["runs"]
    assert ce["epochs"] == EPOCHS and ce["hard_found"] == len(CE_HARD) and ce["plotted"] == len(CE_HARD)
    assert ce["plotted_ids"] == CE_HARD
    assert ce["mean_final_true_prob"] == pytest.approx(CE_HARD_MEAN_FINAL, abs=F16_TOL)
    assert ce["final_test"] == {"epoch": EPOCHS, **metrics_row(EPOCHS, 0.0)["test"]}
    run = load_run(runs["ce"])
    assert ce["eval_ece"] == pytest.approx(evaluate(run.eval_probs, run.eval_labels)["ece"])
    stored = [info["nbytes_stored"] for info in run.store_summary["epochs"].values()]
    assert ce["store_mib_total"] == pytest.approx(sum(stored) / 2**20) and ce["store_mib_total"] > 0
    assert ce["store_mib_per_epoch"] == pytest.approx(ce["store_mib_total"] / EPOCHS)
    # what is left of it: the teachers the store keeps (two by default), not all it wrote
    assert ce["teacher_epochs_kept"] == [EPOCHS - 1, EPOCHS]
    assert ce["store_mib_kept"] == pytest.approx(sum(stored[-2:]) / 2**20)
    assert_pngs(report["files"], {"trajectories.png", "reliability_1_ce.png", "training_curves.png"})


def test_top_limits_the_plotted_samples(runs, tmp_path):
    (ce,) = inspect_json(runs["ce"], "--top", "2", "--out", tmp_path)["runs"]
    assert ce["plotted_ids"] == [7, 9] and ce["hard_found"] == len(CE_HARD)
    assert ce["mean_final_true_prob"] == pytest.approx(0.10, abs=F16_TOL)


def test_ids_plots_the_chosen_samples(runs, tmp_path):
    report = inspect_json(runs["pskd"], "--ids", "5,12", "--out", tmp_path)
    (pskd,) = report["runs"]
    assert report["selection"] == "ids" and pskd["plotted_ids"] == [5, 12]
    assert pskd["mean_final_true_prob"] == pytest.approx(0.7, abs=F16_TOL)
    assert_pngs(report["files"], {"trajectories.png", "training_curves.png"})


@pytest.mark.slow
def test_two_runs_side_by_side_use_the_first_runs_hard_samples(runs, tmp_path):
    report = inspect_json(runs["ce"], runs["pskd"], "--out", tmp_path / "two")
    ce, pskd = report["runs"]
    assert ce["plotted_ids"] == pskd["plotted_ids"] == CE_HARD
    assert pskd["hard_found"] == 1 and pskd["name"] == "pskd/mlp (pskd)"
    assert pskd["mean_final_true_prob"] == pytest.approx(PSKD_MEAN_FINAL_ON_CE_HARD, abs=F16_TOL)
    assert_pngs(report["files"], {"trajectories.png", "reliability_1_ce.png", "training_curves.png"})
    single = inspect_json(runs["ce"], "--out", tmp_path / "one")["files"][0]
    assert png_width(tmp_path / "two" / "trajectories.png") > png_width(Path(single))


def test_text_summary_writes_to_run_inspect_by_default(runs):
    code, output = invoke(runs["pskd"])
    assert code == 0, output
    assert "hard samples  1 found (right in < 50% of the epochs that predicted them)" in output
    assert "plotted       1 samples (hardest of pskd/mlp (pskd)), mean final true-class prob 0.300" in output
    assert f"final test    epoch {EPOCHS}: top-1 err 24.00%" in output
    (pskd,) = inspect_json(runs["pskd"], "--out", runs["pskd"] / "inspect")["runs"]
    assert (f"{pskd['store_mib_total']:.3f} MiB written over {EPOCHS} epochs, {pskd['store_mib_kept']:.3f} MiB "
            f"of it kept (teacher epochs {[EPOCHS - 1, EPOCHS]}; the others pruned" in output)
    assert str(runs["pskd"] / "inspect" / "trajectories.png") in output
    assert (runs["pskd"] / "inspect" / "training_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_run_is_refused(tmp_path):
    code, output = invoke(tmp_path / "nope")
    assert code == 1 and "does not exist" in output and "pskd-store train" in output


def test_run_without_store_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, output = invoke(tmp_path)
    assert code == 1 and f"no pskd-store at {tmp_path / 'store'}: check the path" in output


def test_ids_out_of_range_name_the_id_and_n(runs, tmp_path):
    code, output = invoke(runs["ce"], "--ids", "3,40", "--out", tmp_path)
    assert code == 1 and "sample id 40 is out of range" in output and f"N={N}" in output
    code, output = invoke(runs["ce"], "--ids", "3,x")
    assert code == 2 and "comma-separated list of sample ids" in output


def test_runs_with_other_samples_are_refused(runs, tmp_path):
    other = make_run(tmp_path, "small", {}, "ce", labels=np.arange(30) % K)
    code, output = invoke(runs["ce"], other, "--out", tmp_path / "out")
    assert code == 1 and "N=30" in output and f"N={N}" in output and "same data set" in output


@pytest.mark.slow
def test_console_script_runs_inspect(runs, tmp_path):
    script = shutil.which("pskd-store")
    assert script, "pskd-store is not installed: pip install -e ."
    done = subprocess.run([script, "inspect", str(runs["ce"]), str(runs["pskd"]), "--top", "3", "--json",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [run["plotted_ids"] for run in report["runs"]] == [CE_HARD[:3]] * 2
    assert_pngs(report["files"], {"trajectories.png", "reliability_1_ce.png", "training_curves.png"})


def test_carried_rows_are_not_predictions(tmp_path):
    """Sample 12 is predicted wrong in epochs 1-2, right in 3, then never again (its row is
    carried forward, right); sample 13 is never predicted (its one-hot label is carried).
    Counting carried rows, 12 would be right in 4 of 6 epochs and 13 in all 6."""
    run = tmp_path / "partial"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "ce", "arch": "mlp", "epochs": EPOCHS}))
    store = SoftTargetStore.create(run / "store", LABELS, K)
    for epoch in range(1, EPOCHS + 1):
        probs = design_probs(epoch, {12: (0, 0.2)} if epoch < 3 else {}, LABELS)
        ids = [i for i in range(N) if i != 13 and not (i == 12 and epoch > 3)]
        with store.writer(epoch, from_logits=False) as writer:
            writer.write(torch.tensor(ids), torch.from_numpy(probs[ids]))
        store.seal(epoch)
    loaded = load_run(run)
    assert loaded.trajectory["written"][:, 12].tolist() == [True] * 3 + [False] * 3
    assert np.isnan(loaded.trajectory["true_prob"][3:, 12]).all() and (loaded.trajectory["argmax"][:, 13] == -1).all()
    assert hard_samples(loaded.trajectory, LABELS).tolist() == [12]  # right in 1 of the 3 epochs that predicted it
    report = inspect_json(run, "--ids", "12,13", "--out", tmp_path / "out")
    assert report["runs"][0]["hard_found"] == 1
    assert report["runs"][0]["mean_final_true_prob"] == pytest.approx(0.7, abs=F16_TOL)  # 12's epoch 3; 13 has none
    assert_pngs(report["files"], {"trajectories.png"})  # NaN gaps plot


def test_hard_samples_are_ranked_by_the_fraction_of_their_predicted_epochs_they_were_right_in():
    """Sample 0 is right in 1 of the 3 epochs that predicted it (a third), sample 1 in 2 of
    10 (a fifth): sample 1 is the harder, though right in more epochs."""
    written = np.zeros((10, 2), dtype=bool)
    written[:3, 0] = written[:, 1] = True
    argmax = np.where(written, 1, -1)
    argmax[0, 0] = argmax[:2, 1] = 0
    trajectory = {"written": written, "argmax": argmax, "true_prob": np.where(written, 0.2, np.nan)}
    assert hard_samples(trajectory, np.array([0, 0])).tolist() == [1, 0]


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    code, output = invoke(tmp_path)
    assert code == 1 and f"no store in {tmp_path}: was it made by `pskd-store train`?" in output


def test_a_run_with_no_sealed_epoch_is_refused(tmp_path):
    SoftTargetStore.create(tmp_path / "store", LABELS, K)
    code, output = invoke(tmp_path)
    assert code == 1 and "has no sealed epoch yet: train at least one epoch first" in output


def test_a_run_without_config_is_read_and_a_damaged_config_is_named(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["ce"], run)
    (run / "config.json").unlink()
    assert load_run(run).config == {}  # a run made by hand may have none
    (run / "config.json").write_text("{\"method\": ")
    code, output = invoke(run, "--out", tmp_path / "out")
    assert code == 1 and f"{run / 'config.json'} is not valid JSON" in output


def test_blank_lines_in_metrics_are_skipped_and_a_partial_eval_file_is_named(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["ce"], run)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write("\n\n")
    assert len(load_run(run).metrics) == EPOCHS
    for written, problem in (({"probs": np.ones((2, K), np.float32)}, "lacks ['labels']"),
                             ({"probs": np.ones((3, K), np.float32), "labels": np.array([0, 1, K])},
                              f"holds labels outside [0, {K})"),
                             ({"probs": np.ones((3, K), np.float32), "labels": np.zeros(2, np.int64)},
                              "holds int64 labels of shape (2,) for 3 samples"),
                             ({"probs": np.ones(3, np.float32), "labels": np.zeros(3, np.int64)},
                              "holds float32 probabilities of shape (3,), not (samples, classes) floats")):
        np.savez(run / "eval" / "test_probs.npz", **written)
        code, output = invoke(run, "--out", tmp_path / "out")
        assert code == 1 and f"test_probs.npz {problem}: rerun `pskd-store eval" in output and "Traceback" not in output
    written = RunDirectory(run).write_eval_probs(np.full((4, K), 1 / K, np.float32), np.zeros(4, np.int64),
                                                 sources=["a checkpoint"])
    written.write_bytes(written.read_bytes()[:100])  # what a full disk or a kill made of it, before it was atomic
    code, output = invoke(run, "--out", tmp_path / "out")
    assert code == 1 and "Traceback" not in output
    assert f"{written} cannot be read (" in output and "rerun `pskd-store eval" in output


def test_eval_probabilities_are_written_whole_under_the_name_given(tmp_path):
    """Renamed into place (a reader never meets half a file), and under the name given: NumPy
    adds .npz to a path that lacks it, and `eval -o` named a file that was not there."""
    path = RunDirectory(tmp_path).write_eval_probs(np.eye(K, dtype=np.float32), np.arange(K), sources=["c"],
                                                   path=tmp_path / "out" / "probs")
    assert path == tmp_path / "out" / "probs" and sorted(p.name for p in path.parent.iterdir()) == ["probs"]
    with np.load(path) as data:
        assert data["labels"].tolist() == list(range(K)) and "nll" not in data.files


def test_runs_with_other_labels_are_refused(runs, tmp_path):
    other = make_run(tmp_path, "shifted", {}, "ce", labels=(LABELS + 1) % K)
    code, output = invoke(runs["ce"], other, "--out", tmp_path / "out")
    assert code == 1 and "with different labels" in output and "same data set and split" in output
    fewer = make_run(tmp_path, "subset", {}, "ce", labels=LABELS[:-1])
    code, output = invoke(runs["ce"], fewer, "--out", tmp_path / "out")
    assert code == 1 and f"holds N={len(LABELS) - 1} samples but" in output
    assert "the same samples (the same data set, --train-subset and --val-split)" in output


@pytest.mark.parametrize("inches", [3.6, 4.2, 9.0])
def test_long_run_names_fit_their_titles(inches):
    """A default run directory name (method, arch, data set, date, time) is wrapped so that the
    rendered title lies inside the figure's width."""
    name = "pskd-densenet121-cifar100-alpha0.8-cutmix-20261202-051500-seed3-rank-run-directory"
    title = fit_title(f"{name}\nECE = 3.14%", inches)
    assert title.endswith("\nECE = 3.14%") and title.replace("\n", "") == f"{name}ECE = 3.14%"  # nothing lost
    figure = Figure(figsize=(inches + 0.4, 4))
    text = figure.subplots().set_title(title)
    figure.canvas = FigureCanvasAgg(figure)
    renderer = figure.canvas.get_renderer()
    extent = text.get_window_extent(renderer)
    assert 0 <= extent.x0 and extent.x1 <= figure.bbox.width
    assert len(title.splitlines()) > 2  # a single line would not have fitted


def test_an_epoch_predicted_between_two_gaps_is_drawn_and_every_epoch_is_on_the_axis():
    """Under --aug half of each batch is recorded: a sample predicted in epoch 2 alone, with
    gaps around it, shows as a point, and the axis runs to the last epoch though no plotted
    sample was predicted there."""
    from pskd_store.plots import _draw_samples

    epochs = np.arange(1, 9)
    values = np.full((8, 2), np.nan, dtype=np.float32)
    values[1, 0], values[4, 1] = 0.5, 0.25  # epoch 2 of one sample, epoch 5 of the other
    figure = Figure(figsize=(4, 3))
    ax = figure.subplots()
    ax.set_ylim(0, 1)
    _draw_samples(ax, epochs, values)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    height = pixels.shape[0]
    for epoch, value in ((2, 0.5), (5, 0.25)):
        x, y = ax.transData.transform((epoch, value))
        assert pixels[int(height - y), int(x)].max() < 200  # drawn: not the white background
    assert ax.get_xlim()[0] < 1 and ax.get_xlim()[1] > 8


def test_runs_on_two_image_trees_with_the_same_labels_are_not_inspected_together():
    """Two image trees with the same classes and counts have the same labels: their stores'
    fingerprints of the files tell them apart (a store without names is not checked)."""

    def run(name: str, names_sha256: str | None) -> RunRecord:
        return RunRecord(path=Path(name), config={}, labels=np.zeros(4, dtype=np.int64),
                         trajectory={"written": np.ones((2, 4), dtype=bool)}, metrics=[],
                         store_summary={"fingerprint": {"names_sha256": names_sha256}})

    check_same_samples(run("a", "files of a"), run("b", "files of a"))
    check_same_samples(run("a", None), run("b", "files of b"))
    with pytest.raises(RunError, match="b and a were trained on different image files with the same labels"):
        check_same_samples(run("a", "files of a"), run("b", "files of b"))
