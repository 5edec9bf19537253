"""Signals held back over a section that must not be cut (a checkpoint being saved)."""

from __future__ import annotations

import os
import signal

import pytest

from lookalike.pipeline.interrupts import interrupts_deferred


def test_a_signal_during_the_section_stops_right_after_it(caplog):
    done = []
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        with interrupts_deferred("the checkpoint is being saved"):
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished")  # the section is not cut
    assert done == ["finished"]
    assert "SIGINT received while the checkpoint is being saved: stopping once it is done" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in force before


def test_a_second_signal_stops_at_once(caplog):
    done = []
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        with interrupts_deferred("the checkpoint is being saved"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished")
    assert done == [] and "SIGINT received again while the checkpoint is being saved: stopping now" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_is_held_without_a_signal():
    with interrupts_deferred("the checkpoint is being saved"):
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
