"""Beam's Dask runner with its bundle-output bug fixed, for ``--runner=dask``.

Beam 2.77's ``DaskRunner`` collects a DoFn's outputs before calling ``finish_bundle``,
so whatever a DoFn emits there is lost; ``BatchElements`` (inside ``RunInference``)
emits each bundle's last batch exactly there, so the last batch of every Dask
partition would silently vanish. Its receivers are also shared by every partition a
process runs. ``FixedDaskRunner`` swaps in a per-partition function that runs the
DoFn on a private copy of its invoker arguments and collects outputs after
``finish_bundle``. Everything else is Beam's runner. The pipeline itself avoids the
runner's other limits (tagged outputs are merged; only the last transform is
computed): see ``lookalike.pipeline.batches`` and the ``Done`` transform.
"""

from __future__ import annotations

import logging

from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.common import DoFnInvoker
from apache_beam.runners.dask import dask_runner, transform_evaluator

log = logging.getLogger(__name__)

DEFAULT_WORKER_TIMEOUT_S = 120


class DaskRunnerError(RuntimeError):
    """The Dask cluster cannot run the pipeline (scheduler unreachable, no workers); the message says why."""


class DaskWorkerOptions(PipelineOptions):
    """``--dask_worker_timeout_s``: how long a run waits for a first worker to join the scheduler."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--dask_worker_timeout_s", type=float, default=DEFAULT_WORKER_TIMEOUT_S,
            help="fail when no Dask worker is connected to the scheduler within this many seconds (0: wait forever)")

def apply_dofn_to_bundle_fixed(items, do_fn_invoker_args, do_fn_invoker_kwargs, tagged_receivers):
    """Run a DoFn over one Dask partition, keeping outputs emitted in ``finish_bundle``."""
    do_fn_invoker_args, do_fn_invoker_kwargs, tagged_receivers = pickler.loads(
        pickler.dumps((do_fn_invoker_args, do_fn_invoker_kwargs, tagged_receivers)))
    tagged_receivers.values.clear()
    invoker = DoFnInvoker.create_invoker(*do_fn_invoker_args, **do_fn_invoker_kwargs)
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return [v.value for v in tagged_receivers.values]


class FixedDaskRunner(dask_runner.DaskRunner):
    """``DaskRunner`` whose ParDo partitions keep ``finish_bundle`` output, and which fails
    with a ``DaskRunnerError`` naming the scheduler when it cannot be reached, or when no
    worker joins it within ``--dask_worker_timeout_s`` (Beam's runner would wait silently)."""

    def run_pipeline(self, pipeline, options):
        transform_evaluator.apply_dofn_to_bundle = apply_dofn_to_bundle_fixed
        address = options.view_as(dask_runner.DaskOptions).address or "a new local cluster"
        try:
            result = super().run_pipeline(pipeline, options)
        except OSError as e:  # distributed: "Timed out trying to connect to tcp://...", refused, unknown host
            raise DaskRunnerError(f"cannot connect to the Dask scheduler at {address}: {e} (is `dask scheduler` "
                                  "running there? --dask_connection_timeout=S sets how long to try)") from None
        wait_for_a_worker(result, address, options.view_as(DaskWorkerOptions).dask_worker_timeout_s)
        return result


def wait_for_a_worker(result, address: str, timeout_s: float) -> None:
    """Return once the scheduler has a worker. Without one, log a warning saying so, wait up to
    ``timeout_s`` (forever if 0) and then cancel the run and raise DaskRunnerError."""
    client = result.client
    if client.scheduler_info().get("workers"):
        return
    log.warning("no Dask workers are connected to the scheduler at %s: the run waits for one (start workers with "
                "`dask worker %s`)%s", address, address,
                f"; it fails after {timeout_s:g} s" if timeout_s > 0 else "")
    try:
        client.wait_for_workers(1, timeout=timeout_s if timeout_s > 0 else None)
    except TimeoutError:
        result.cancel()
        client.close()
        raise DaskRunnerError(f"no Dask worker connected to the scheduler at {address} within {timeout_s:g} s "
                              "(--dask_worker_timeout_s); start workers with `dask worker ADDRESS`") from None
    log.info("a Dask worker joined the scheduler at %s", address)


RUNNER_PATH = f"{__name__}.FixedDaskRunner"
