"""Logging for long commands: to the terminal and to a file in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(log_file: Path | None = None) -> None:
    """pskd-store's own messages at INFO; other libraries' (botocore, fsspec) at WARNING."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, delay=True))  # made by the first line logged
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    logging.getLogger("pskd_store").setLevel(logging.INFO)
