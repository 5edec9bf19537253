"""Log format and library noise (``lookalike.pipeline.logs``), in fresh interpreters: what they
show depends on what was imported and configured first."""

from __future__ import annotations

import subprocess
import sys


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_a_misspelt_embed_flag_shows_the_usage_without_beams_import_warning():
    """`embed --incremntal` lists Beam's options to spot the typo; importing Beam warns "apitools not found"
    through the root logger: that exact line must not come before argparse's usage message."""
    out = run_python("-m", "lookalike.pipeline.cli", "embed", "--incremntal")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: lookalike embed"), out.stderr[:500]
    assert "apitools" not in out.stderr and "did you mean --incremental?" in out.stderr


def test_beams_import_warning_is_dropped_and_the_log_is_configured_as_usual_after_it():
    """Beam's module-level logging.warning at import, before configure_logging: only that message goes,
    other warnings still show (in our format), and configure_logging still sets our format and INFO level."""
    script = """
import logging
from lookalike.pipeline.logs import configure_logging, quiet_library_noise
quiet_library_noise()
import apache_beam.io.gcp.internal.clients.bigquery  # warns "apitools not found" when apitools is absent
logging.warning("another warning")
configure_logging(False)
logging.getLogger("lookalike.test").info("an info line")
"""
    out = run_python("-c", script)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "apitools" not in out.stderr and "WARNING:root" not in out.stderr
    assert " WARNING root: another warning" in out.stderr
    assert " INFO lookalike.test: an info line" in out.stderr
