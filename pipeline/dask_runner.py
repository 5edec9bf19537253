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

from apache_beam.internal import pickler
from apache_beam.runners.common import DoFnInvoker
from apache_beam.runners.dask import dask_runner, transform_evaluator

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
    """``DaskRunner`` whose ParDo partitions keep ``finish_bundle`` output."""

    def run_pipeline(self, pipeline, options):
        transform_evaluator.apply_dofn_to_bundle = apply_dofn_to_bundle_fixed
        return super().run_pipeline(pipeline, options)


RUNNER_PATH = f"{__name__}.FixedDaskRunner"
