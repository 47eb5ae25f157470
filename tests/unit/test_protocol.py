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


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "kind": "hello"}),
    msgpack.packb({"v": 1, "kind": "nope"}), msgpack.packb({"v": 1, "kind": "hello", "name": "x"}),
    msgpack.packb({"v": 1, "kind": "hello", "name": "x", "pid": 1, "extra": 2}),
    msgpack.packb({"v": 1, "kind": "hello", "name": "x", "pid": 1}) + b"trailing",
    msgpack.packb({1: 2}), b"\x91" * 100000, b"x" * (p.MAX_FRAME_BYTES + 1),
])
def test_bad_frames_raise_protocol_error(frame):
    with pytest.raises(ProtocolError):
        p.decode(frame)
