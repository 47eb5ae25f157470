"""Fixtures for one real worker process against tests/fakes/broker.py."""

from __future__ import annotations

import pytest

from tests.fakes.broker import FakeBroker
from visor import protocol


@pytest.fixture
def fake_broker(home):
    """Starts one worker against a stand-in broker in the home; closes both at the end."""
    started: list[FakeBroker] = []

    def start(module: str, name: str, *args: str, **kwargs) -> FakeBroker:
        broker = FakeBroker(home.root, module, name, *args, **kwargs)
        started.append(broker)
        [(_, hello)] = broker.wait_for(protocol.Hello)
        assert hello.name == name
        return broker
    yield start
    for broker in started:
        broker.close()
