"""The ``pskd-store`` command line: train, eval, inspect, info and verify."""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute", what it does): a subcommand is imported only when it runs
# (torch and torchvision take seconds to import, and `info` needs neither); `--help` lists
# them from here.
COMMANDS = {
    "train": ("pskd_store.cli.train:train_command", "Train a classifier with PS-KD or a baseline."),
    "eval": ("pskd_store.cli.eval:eval_command", "Test metrics of checkpoints; writes test probabilities."),
    "inspect": ("pskd_store.cli.inspect:inspect_command", "Plot trajectories, calibration and hard examples."),
    "info": ("pskd_store.cli.info:info_command", "Print what a store holds."),
    "verify": ("pskd_store.cli.verify:verify_command", "Check every checksum and value; exit 1 if damaged."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The subcommands with their summaries, none of them imported."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pskd-store")
def cli() -> None:
    """Progressive self-knowledge distillation (PS-KD) with past predictions kept in a
    chunked, compressed Zarr store instead of a teacher model or an in-memory table.

    \b
    pskd-store train                      offline default: MNIST-1D, about 15 s on 2 CPU cores
    pskd-store train --dataset cifar100 --arch densenet121
    pskd-store eval RUN_DIR               test metrics; writes test probabilities
    pskd-store inspect RUN_DIR [RUN_DIR]  trajectories, calibration, hard examples
    pskd-store info RUN_DIR/store         what a store holds
    pskd-store verify RUN_DIR             every checksum and value; exit 1 if damaged
    """


if __name__ == "__main__":  # python -m pskd_store.cli.main, as torchrun -m runs it
    cli()
