"""Log format and library noise, the same in the ``lookalike`` process and in the Beam worker
processes it starts (``lookalike.pipeline.workers``), so every line of a run reads alike."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Libraries whose INFO lines say nothing about the user's job (Beam's harness start and stop,
# orbax's checkpoint reads, JAX's backend probing): WARNING and above only, unless --verbose.
NOISY_LOGGERS = ("apache_beam", "absl", "jax", "orbax", "matplotlib", "httpx", "tensorflow")


class LibraryNoise(logging.Filter):
    """Drops warnings Beam logs on every run that say nothing about the user's job (optional
    Google Cloud clients absent; no ``resource`` module stats; a worker process without a
    staging folder, which the local runner never has). Only these exact messages: any other
    warning or error still shows."""

    ROOT_PREFIXES = ("apitools not found", "Resource module is not available")
    BEAM_PREFIXES = ("No semi_persistent_directory found",)

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "root":
            return not message.startswith(self.ROOT_PREFIXES)
        if record.name.startswith("apache_beam") and record.levelno < logging.ERROR:
            return not message.startswith(self.BEAM_PREFIXES)
        return True


def configure_logging(verbose: bool) -> None:
    """Timestamped lines on stderr; INFO (DEBUG with ``verbose``) for lookalike, WARNING for noisy libraries."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    if not verbose:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(LibraryNoise())


__all__ = ["DATE_FORMAT", "LOG_FORMAT", "NOISY_LOGGERS", "LibraryNoise", "configure_logging"]
