"""Wire messages: every one round-trips; anything else is a ProtocolError, never a crash."""

import dataclasses

import msgpack
import pytest

from visor import protocol as p
from visor.errors import ProtocolError

SAMPLES = {"str": "x", "int": 7, "float": 1.5, "bool": True, "list[str]": ["a", "b"], "dict[str, Any]": {"k": 1},
           "int | None": None, "dict[str, str]": {"k": "v"}}


@pytest.mark.parametrize("cls", list(p.MESSAGES.values()), ids=lambda c: c.kind)
def test_every_message_round_trips(cls):
    kwargs = {f.name: SAMPLES[f.type] for f in dataclasses.fields(cls)}
    msg = cls(**kwargs)
    assert p.decode(p.encode(msg)) == msg


V = p.VERSION


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"v": V + 1, "kind": "hello"}),
    msgpack.packb({"v": V, "kind": "nope"}), msgpack.packb({"v": V, "kind": "hello", "name": "x"}),
    msgpack.packb({"v": V, "kind": "hello", "name": "x", "pid": 1, "extra": 2}),
    msgpack.packb({"v": V, "kind": "hello", "name": "x", "pid": 1}) + b"trailing",
    msgpack.packb({"v": V + 1, "kind": "start_binary", "path": "x", "args": [], "stop_timeout_s": 1.0}),
    msgpack.packb({1: 2}), b"\x91" * 100000, b"x" * (p.MAX_FRAME_BYTES + 1),
])
def test_bad_frames_raise_protocol_error(frame):
    with pytest.raises(ProtocolError):
        p.decode(frame)


@pytest.mark.parametrize("version", [0, 1, p.VERSION + 1])
def test_a_hello_of_another_version_still_says_who_it_is(version):
    """A runner that outlived its broker may run older or newer code: the broker must learn its name,
    pid and version to decide what to do with it (it cannot command it)."""
    frame = msgpack.packb({"v": version, "kind": "hello", "name": "runner:vega", "pid": 42, "new_field": [1]})
    assert p.decode(frame) == p.Hello(name="runner:vega", pid=42, proto=version)
