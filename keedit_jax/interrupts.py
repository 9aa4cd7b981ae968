"""Ctrl-C and SIGTERM that are never lost.

Python runs a signal handler between two bytecodes of the main thread; when those bytecodes
belong to a garbage-collector callback (JAX registers one), the exception the handler raises is
reported as unraisable and dropped, and the run would go on to finish. The handler therefore
also records the signal, and the loops call `raise_pending` at each batch's end.
"""

import signal
from typing import Any


class Terminated(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


_received: list[int] = []


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise _exception(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (the main thread only, as `signal` requires)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)


def raise_pending() -> None:
    """At a safe point: raise for a signal whose exception Python dropped."""
    if _received:
        raise _exception(_received[0])
