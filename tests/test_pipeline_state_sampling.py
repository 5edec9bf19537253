"""Beam's state sampler samples often enough that a long bundle ends with its work."""

from apache_beam.runners.worker import statesampler
from apache_beam.utils.counters import CounterFactory

import lookalike.pipeline.batches  # noqa: F401  (what worker processes import to run our DoFns)
from lookalike.pipeline.state_sampling import SAMPLING_PERIOD_MAX_MS, shorten_state_sampling


def test_importing_the_pipeline_shortens_beams_sampling_period():
    sampler = statesampler.StateSampler("step", CounterFactory())
    assert sampler.sampling_period_ms == SAMPLING_PERIOD_MAX_MS < statesampler.DEFAULT_SAMPLING_PERIOD_MS
    assert shorten_state_sampling(50)  # never lengthens it again
    assert statesampler.StateSampler("step", CounterFactory()).sampling_period_ms == SAMPLING_PERIOD_MAX_MS
    sampler.start()
    sampler.stop()  # the sampler thread runs and joins with the shorter period
    assert sampler.finished
