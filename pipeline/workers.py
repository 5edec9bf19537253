"""The worker processes of the local runner's multi-process mode (``--num-workers N``).

Beam's ``FnApiRunner`` starts each worker as ``python -m apache_beam.runners.worker.sdk_worker_main``,
whose logging is not the ``lookalike`` process's: raw ``INFO:name:message`` lines without
time, some 40 lines of harness start-up and shut-down per worker, and every record shipped
back to the runner, which logs a worker's warnings a second time as one-line protobuf dumps.
``LocalRunner`` starts them through ``python -m lookalike.pipeline.worker_main`` instead,
which configures logging as the CLI does
(``lookalike.pipeline.logs``: same format, Beam and absl at WARNING, known noise dropped),
lets a worker log only to the stderr it inherited from the ``lookalike`` process, and then
runs Beam's harness unchanged.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Any

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

log = logging.getLogger(__name__)


def worker_label() -> str:
    """This process's name in per-worker progress lines: Beam's worker id in a worker process, else the pid."""
    return os.environ.get("WORKER_ID") or f"pid {os.getpid()}"


def worker_command(verbose: bool) -> str:
    """The shell command that starts one worker process (Beam runs it with ``sh -c``)."""
    return f"exec {shlex.quote(sys.executable)} -m lookalike.pipeline.worker_main" + (" --verbose" if verbose else "")


class LocalRunner(FnApiRunner):
    """Beam's in-process ``FnApiRunner``; in its multi-process mode (``--direct_running_mode=
    multi_processing``) workers start through ``lookalike.pipeline.worker_main``."""

    def resolve_any_environments(self, pipeline_proto: Any) -> Any:
        pipeline_proto = super().resolve_any_environments(pipeline_proto)
        command = worker_command(logging.getLogger("lookalike").getEffectiveLevel() <= logging.DEBUG)
        for env in pipeline_proto.components.environments.values():
            if env.urn == python_urns.SUBPROCESS_SDK:
                env.payload = command.encode("utf-8")
        return pipeline_proto


__all__ = ["LocalRunner", "worker_command", "worker_label"]
