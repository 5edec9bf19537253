"""Bundles that end when their work ends: a shorter period for Beam's state sampler.

Beam's SDK harness runs a state sampler thread per bundle. It sleeps between samples,
its period growing from 2 ms to 200 ms, and the bundle finishes only after ``stop()`` has
joined that thread, so a bundle that ran for more than a few seconds, such as the embed
stage, ends up to 200 ms (on average 100 ms) after its last element. Sampling every 20 ms
at most bounds that wait; a sample is a lock and a few additions without the GIL, so 50
a second cost nothing measurable. Beam has no option for the period (its constructor's
default), hence this setting of that default, made when ``lookalike.pipeline.batches`` is
imported: in the launching process and in every worker process that unpickles our DoFns.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Longest sleep of Beam's state sampler between two samples (Beam's default is 200 ms).
SAMPLING_PERIOD_MAX_MS = 20


def shorten_state_sampling(period_ms: int = SAMPLING_PERIOD_MAX_MS) -> bool:
    """Make ``period_ms`` the default sampling period of Beam's StateSampler; False (and
    nothing changed) if this Beam version's constructor does not look as expected."""
    try:
        from apache_beam.runners.worker import statesampler
    except ImportError:  # pragma: no cover - Beam is a dependency
        return False
    init = statesampler.StateSampler.__init__
    defaults = getattr(init, "__defaults__", None)
    if not defaults or len(defaults) != 1 or not isinstance(defaults[0], int):
        log.debug("Beam's StateSampler has defaults %r: sampling period left as is", defaults)
        return False
    init.__defaults__ = (min(defaults[0], period_ms),)
    return True
