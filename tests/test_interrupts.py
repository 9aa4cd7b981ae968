"""A signal that arrives while a garbage-collector callback runs is not lost."""

import gc
import os
import signal

import pytest

from keedit_jax import interrupts


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupts._received.clear()
    interrupts.install()
    yield
    interrupts._received.clear()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _signal_inside_gc_callback(signum: int) -> None:
    """Python drops (as unraisable) the exception a handler raises inside a gc callback."""
    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            os.kill(os.getpid(), signum)
            sum(range(1000))  # bytecodes for the handler to run between

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("signum, exception", [(signal.SIGTERM, interrupts.Terminated),
                                               (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_dropped_inside_a_gc_callback_is_raised_at_the_next_safe_point(
        handlers, signum, exception):
    _signal_inside_gc_callback(signum)  # returns: the exception was dropped
    with pytest.raises(exception):
        interrupts.raise_pending()


def test_without_a_signal_the_safe_point_does_nothing(handlers):
    interrupts.raise_pending()
