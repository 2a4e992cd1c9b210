"""Training methods are objects (methods.py): a new one is a subclass and a registration,
trained by the unchanged loop; methods that read no teacher decode none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pskd_store.methods import METHODS, Batch, Method, create_method
from pskd_store.recipe import TrainConfig
from pskd_store.store import SoftTargetStore
from pskd_store.training import train


class FirstHalfOnly(Method):
    """A method of this test alone: CE on the first half of each batch, twice weighted,
    and only the first half of that half's predictions recorded."""

    name = "first_half"
    description = "a test's toy method"

    def batch(self, inputs, targets, labels, ids) -> Batch:
        half = len(labels) - len(labels) // 2
        return Batch(inputs[:half], labels[:half], labels[:half], ids[:half], recorded=half // 2)

    def loss(self, logits, targets, partner_logits=None):
        return 2 * F.cross_entropy(logits.float(), targets)


def first_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_method_defined_in_a_test_trains_through_the_loop(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(METHODS, FirstHalfOnly.name, FirstHalfOnly)
    common = dict(epochs=2, steps_per_epoch=1, batch_size=64, data_dir=str(data_dir))
    train(TrainConfig(method="first_half", **common).resolved(), tmp_path / "toy", quiet=True)
    train(TrainConfig(method="ce", **common).resolved(), tmp_path / "ce", quiet=True)
    toy, ce = first_rows(tmp_path / "toy"), first_rows(tmp_path / "ce")
    # the toy trains on the first half of the loader's batches and records half of that
    assert toy[0]["train"]["samples"] == 32 and ce[0]["train"]["samples"] == 64
    store = SoftTargetStore.open(tmp_path / "toy" / "store", read_only=True)
    assert [store.epoch_info(epoch)["ids_written"] for epoch in (1, 2)] == [16, 16]
    assert toy[0]["alpha_t"] == 0.0 and toy[1]["alpha_t"] == 0.0


def test_the_toy_methods_loss_is_its_own():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert FirstHalfOnly().loss(logits, labels) == pytest.approx(2 * create_method(
        TrainConfig(method="ce").resolved()).loss(logits, labels).item())


def test_an_unregistered_method_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'first_half'; choose one of ce, ls, pskd, tfkd, cskd"):
        TrainConfig(method="first_half").resolved()
    with pytest.raises(ValueError, match="unknown method 'first_half'; choose one of ce, ls, pskd, tfkd, cskd"):
        create_method(TrainConfig(method="first_half"))  # a configuration never resolved


@pytest.mark.parametrize("method, decodes", [("ce", False), ("ls", False), ("tfkd", False), ("cskd", False),
                                             ("pskd", True)])
def test_only_pskd_decodes_a_teacher(tmp_path, data_dir, method, decodes):
    run = tmp_path / method
    train(TrainConfig(method=method, epochs=2, steps_per_epoch=2, data_dir=str(data_dir)).resolved(), run,
          quiet=True)
    assert bool(list((run / "store.mmap").glob("epoch_*.npy"))) == decodes
    assert SoftTargetStore.open(run / "store", read_only=True).sealed_epochs == [1, 2]  # every method records


def test_readmes_own_method_example_trains(tmp_path, data_dir, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("**Your own method**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setitem(METHODS, "pskd_ls", None)  # undone after the test: the registration ends with it
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert METHODS["pskd_ls"] is namespace["SmoothedPsKd"]
    train(TrainConfig(method="pskd_ls", epochs=2, steps_per_epoch=2, data_dir=str(data_dir)).resolved(),
          tmp_path / "run", quiet=True)
    rows = first_rows(tmp_path / "run")
    assert rows[1]["alpha_t"] == pytest.approx(0.8)  # PS-KD's schedule, inherited
    logits, soft = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), 1)
    assert namespace["SmoothedPsKd"]().loss(logits, soft) == pytest.approx(
        F.cross_entropy(logits, 0.9 * soft + 0.01).item(), rel=1e-6)
