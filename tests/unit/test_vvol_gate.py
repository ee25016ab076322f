"""The path-switch gate of a virtual volume (hold new requests, drain in-flight, release)."""
from __future__ import annotations

import threading
import time

from replicator.vvol import Gate


def test_hold_waits_for_inflight_and_blocks_new_requests():
    g = Gate()
    g.enter()
    held = threading.Event()
    admitted = []

    def switch():
        assert g.hold(5)
        held.set()

    s = threading.Thread(target=switch)
    s.start()
    time.sleep(0.05)
    assert not held.is_set()          # in-flight request still running
    late = threading.Thread(target=lambda: admitted.append(g.enter()))
    late.start()
    time.sleep(0.05)
    assert not admitted               # new requests wait while a switch holds the gate
    g.exit()
    s.join(2)
    assert held.is_set() and g.inflight == 0
    time.sleep(0.05)
    assert not admitted
    g.release()
    late.join(2)
    assert admitted and admitted[0] >= 0.05  # it was held, not refused
    g.exit()


def test_hold_times_out_and_reopens():
    g = Gate()
    g.enter()
    assert g.hold(0.05) is False
    assert not g.holding
    assert g.enter() < 0.05           # admitted again without waiting for a release
    g.exit()
    g.exit()
    assert g.inflight == 0
