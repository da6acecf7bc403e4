"""Control-plane review: races and state errors of the rendezvous, the runtime's lifecycle and the symmetric
module's argument checks, each found failing on the code before its fix (CPU only)."""

from __future__ import annotations

import threading
import time

import pytest
from dwdp_ops.launch import free_port
from dwdp_ops.rendezvous import Rendezvous


@pytest.mark.timeout(120)
def test_second_rendezvous_on_the_same_port_waits_for_the_first_to_close():
    """Two rendezvous one after the other on one port: rank 1 is done with the first and dials the second while rank
    0 still holds the first (it closes it a moment later). Rank 1's hello reached the first one's doorman, which
    answered "arrived after all 2 ranks had joined", and the second rendezvous failed on rank 1 (then on rank 0,
    which waited the whole timeout for it)."""
    port, out = free_port(), {}

    def rank(r):
        try:
            with Rendezvous(r, 2, "127.0.0.1", port, 30.0) as first:
                first.barrier("first")
                if r == 0:
                    time.sleep(2.0)  # rank 1 dials the next rendezvous meanwhile
            with Rendezvous(r, 2, "127.0.0.1", port, 30.0) as second:
                out[r] = second.allgather("second", bytes([r]))
        except Exception as e:  # noqa: BLE001
            out[r] = e

    ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(100)
    assert out == {0: [b"\x00", b"\x01"], 1: [b"\x00", b"\x01"]}, out
