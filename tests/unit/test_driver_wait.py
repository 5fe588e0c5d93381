"""The driver's main-thread wait, without Ray: it never drops a signal."""

from __future__ import annotations

import signal
import threading
import time

from ray_dyncheck import driver
from ray_dyncheck._shutdown import Signals, wait_for


def test_wait_hands_out_every_signal_once_in_order():
    rec = Signals()
    for signum in (signal.SIGINT, signal.SIGTERM):
        rec.handler(signum, None)
    never = lambda: False  # noqa: E731
    assert [wait_for(never, rec, time.monotonic() + 1)[0] for _ in range(2)] == [signal.SIGINT, signal.SIGTERM]
    assert wait_for(never, rec, time.monotonic() + 0.2) is None

    def lands_mid_loop():  # a signal that arrives while the wait is between its checks
        if not rec.received and not landed:
            landed.append(1)
            rec.handler(signal.SIGINT, None)
        return False

    landed: list[int] = []
    assert wait_for(lands_mid_loop, rec, time.monotonic() + 1)[0] == signal.SIGINT
    threading.Timer(0.3, rec.handler, args=(signal.SIGTERM, None)).start()  # one during the sleep
    t0 = time.monotonic()
    assert wait_for(never, rec, time.monotonic() + 5)[0] == signal.SIGTERM
    assert time.monotonic() - t0 < 1.0


def test_wait_drops_duplicates_inside_the_debounce():
    rec = Signals()
    rec.handler(signal.SIGINT, None)
    (_, t_first) = wait_for(lambda: False, rec, None)
    rec.handler(signal.SIGINT, None)  # the terminal's copy, milliseconds later
    assert wait_for(lambda: False, rec, time.monotonic() + 0.2, after=t_first + driver.DEBOUNCE_S) is None
    assert not rec.received

