"""The event table and the Publisher: required fields, envelope, never blocking."""

import threading

import msgpack
import pytest
import zmq

from tests.helpers import stalled_subscribers, wait_until
from visor.events import EVENTS, Publisher


@pytest.fixture
def pub_sub(tmp_path):
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/e.sock"
    pub = Publisher(ctx, endpoint)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    yield pub, sub
    pub.close()
    ctx.destroy(linger=0)


def test_every_spec_event_type_is_in_the_table():
    assert set(EVENTS) >= {"visor.started", "visor.stopping", "visor.stopped", "visor.failed", "worker.started",
                           "worker.exited", "binary.started", "binary.exited", "binary.restart_scheduled",
                           "upgrade.accepted", "upgrade.ready", "upgrade.started", "upgrade.completed",
                           "upgrade.blocked", "fetch.started", "fetch.progress", "fetch.completed", "fetch.failed",
                           "config.reloaded", "config.rejected", "rpc.unreachable"}


def test_an_event_has_topic_envelope_and_increasing_seq(pub_sub):
    pub, sub = pub_sub
    received = []

    def joined():                                     # the subscription takes a moment to arrive
        pub.emit("upgrade.accepted", tag="v2", height=5)
        return sub.poll(20)
    wait_until(joined, what="the subscriber to join")
    for n in range(3):
        pub.emit("binary.exited", name="vega", pid=1, exitcode=-9)

    def three_exits():
        while sub.poll(0):
            received.append(sub.recv_multipart())
        return [t for t, _ in received].count(b"binary.exited") == 3
    wait_until(three_exits, what="the three events")
    topics = [t for t, _ in received]
    bodies = [msgpack.unpackb(b) for _, b in received]
    assert topics[-3:] == [b"binary.exited"] * 3
    last = bodies[-1]
    assert last["v"] == 1 and last["type"] == "binary.exited" and isinstance(last["ts"], float)
    assert [b["seq"] for b in bodies] == list(range(bodies[0]["seq"], bodies[0]["seq"] + len(bodies)))


def test_a_missing_field_is_our_bug(pub_sub):
    with pytest.raises(ValueError, match="missing"):
        pub_sub[0].emit("binary.exited", name="vega")


def test_a_subscriber_that_never_reads_never_blocks_the_publisher(tmp_path):
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/stalled.sock"
    pub = Publisher(ctx, endpoint)
    stalled = stalled_subscribers(endpoint, 0, 1)
    live = ctx.socket(zmq.SUB)
    live.setsockopt(zmq.SUBSCRIBE, b"visor.")
    live.connect(endpoint)
    emitted = []

    def flood():                                      # far past the high-water mark and the kernel buffers
        for n in range(20000):
            pub.emit("fetch.progress", tag="v", asset="a", bytes=n, total=1)
            emitted.append(n)
    try:
        flooding = threading.Thread(target=flood, daemon=True)
        flooding.start()
        flooding.join(20)
        assert not flooding.is_alive(), f"emit blocked after {len(emitted)} events on a subscriber that never reads"
        assert len(emitted) == 20000

        def heard():                                  # and it still publishes to those who do read
            pub.emit("visor.stopping", pid=1, home="h")
            return live.poll(50) and msgpack.unpackb(live.recv_multipart()[1])
        assert wait_until(heard, what="a reading subscriber to hear the next event")["type"] == "visor.stopping"
    finally:
        stalled.kill()
        stalled.wait(5)
        stalled.stdout.close()
        pub.close()
        ctx.destroy(linger=0)
