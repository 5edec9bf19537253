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


def test_only_orbax_late_callback_noise_is_dropped_from_unraisable_exceptions(monkeypatch):
    """A failed orbax read leaves TensorStore callbacks that hit a closed event loop: Python
    prints "Exception ignored in: None ... Event loop is closed" 0-5 times after the real error.
    Exactly that is dropped; any other unraisable exception reaches the previous hook."""
    import asyncio
    import sys
    import types

    from lookalike.pipeline.logs import drop_late_callback_noise, late_callback_noise

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e

    def args(exc: BaseException, obj: object = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__, err_msg=None,
                                     object=obj)

    try:
        raise RuntimeError("Event loop is closed")
    except RuntimeError as e:
        elsewhere = e
    assert late_callback_noise(args(closed))
    assert not late_callback_noise(args(elsewhere)) and not late_callback_noise(args(closed, obj=loop))
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    drop_late_callback_noise()
    sys.unraisablehook(args(closed))
    sys.unraisablehook(args(elsewhere))
    assert [a.exc_value for a in seen] == [elsewhere]


def test_library_noise_drops_only_the_known_messages():
    import logging

    from lookalike.pipeline.logs import LibraryNoise

    def kept(name: str, level: int, message: str) -> bool:
        return LibraryNoise().filter(logging.LogRecord(name, level, __file__, 1, message, (), None))

    assert not kept("absl", logging.WARNING, "Waiting for previous save to complete took 1.047062 seconds. If this "
                                             "number is high, consider checkpointing less frequently.")
    assert not kept("root", logging.WARNING, "apitools not found, and bigquery client libraries are not available")
    assert kept("absl", logging.WARNING, "Something else about a checkpoint")
    assert kept("absl", logging.ERROR, "Waiting for previous save to complete failed")
    assert kept("lookalike.model.train", logging.WARNING, "Waiting for previous save to complete")


def test_orbax_errors_keep_their_line_without_the_traceback_and_other_errors_keep_theirs():
    import logging
    import sys

    from lookalike.pipeline.logs import QuietFormatter

    try:
        raise OSError(28, "No space left on device")
    except OSError:
        failure = sys.exc_info()
    orbax = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/async_checkpointer.py", 1,
                              "Save Finalize thread failed.", (), failure)
    assert QuietFormatter("%(message)s").format(orbax) == "Save Finalize thread failed. (traceback with --verbose)"
    assert "Traceback" in logging.Formatter("%(message)s").format(orbax)  # the record is left whole for other handlers
    # absl names itself as the caller unless its logger class is installed: orbax's frames in the traceback tell
    import importlib.util
    import pathlib
    import tempfile

    folder = pathlib.Path(tempfile.mkdtemp()) / "orbax"
    folder.mkdir()
    (folder / "save.py").write_text("def save():\n    raise OSError(28, 'No space left on device')\n")
    spec = importlib.util.spec_from_file_location("orbax_like_save", folder / "save.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.save()
    except OSError:
        raised = logging.LogRecord("absl", logging.ERROR, "/site-packages/absl/logging/__init__.py", 1,
                                   "Save Finalize thread failed.", (), sys.exc_info())
    assert QuietFormatter("%(message)s").format(raised) == "Save Finalize thread failed. (traceback with --verbose)"
    other = logging.LogRecord("absl", logging.ERROR, "/site-packages/other/lib.py", 1, "failed", (), failure)
    mine = logging.LogRecord("lookalike.model.train", logging.ERROR, __file__, 1, "failed", (), failure)
    assert all("Traceback" in QuietFormatter("%(message)s").format(r) for r in (other, mine))
