"""The ``pskd-store`` command line: train, eval, inspect, info and verify."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of each subcommand, imported only when it runs: torch and
# torchvision take seconds to import, and `info` needs neither.
COMMANDS = {
    "train": "pskd_store.cli.train:train_command",
    "eval": "pskd_store.cli.eval:eval_command",
    "inspect": "pskd_store.cli.inspect:inspect_command",
    "info": "pskd_store.cli.info:info_command",
    "verify": "pskd_store.cli.verify:verify_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pskd-store")
def cli() -> None:
    """Progressive self-knowledge distillation (PS-KD) with past predictions kept in a
    chunked, compressed Zarr store instead of a teacher model or an in-memory table.

    \b
    pskd-store train                      offline default: MNIST-1D, about a minute on 2 CPU cores
    pskd-store train --dataset cifar100 --arch densenet121
    pskd-store eval RUN_DIR               test metrics; writes test probabilities
    pskd-store inspect RUN_DIR [RUN_DIR]  trajectories, calibration, hard examples
    pskd-store info RUN_DIR/store         what a store holds
    pskd-store verify RUN_DIR             every checksum and value; exit 1 if damaged
    """
