import click

@click.group()
def cli() -> None:
    """pskd-store."""
