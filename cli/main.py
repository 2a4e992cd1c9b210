"""The ``pskd-store`` command line: train, eval, inspect and info."""

from __future__ import annotations

import click

from .eval import eval_command
from .info import info_command
from .inspect import inspect_command
from .train import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pskd-store")
def cli() -> None:
    """Progressive self-knowledge distillation (PS-KD) with past predictions kept in a
    chunked, compressed Zarr store instead of a teacher model or an in-memory table.

    \b
    pskd-store train                      offline default: MNIST-1D, a few minutes on CPU
    pskd-store train --dataset cifar100 --arch densenet121
    pskd-store eval RUN_DIR               test metrics; writes test probabilities
    pskd-store inspect RUN_DIR [RUN_DIR]  trajectories, calibration, hard examples
    pskd-store info RUN_DIR/store         what a store holds
    """


cli.add_command(train_command)
cli.add_command(eval_command)
cli.add_command(inspect_command)
cli.add_command(info_command)
