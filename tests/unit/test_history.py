"""The event history file: what is recorded, rotation and its bound, failures that cost only the history,
reading it back (`--since`), and `visor events --no-follow` on a home with no daemon."""

import io
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from tests.helpers import run_cli, wait_until
from visor import history
from visor.control import print_events
from visor.errors import VisorError
from visor.events import Publisher
from visor.history import History, parse_duration, read_history
from visor.home import Home


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_event_sent_is_recorded_first_with_exactly_the_fields_sent(tmp_path):
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/e.sock"
    pub = Publisher(ctx, endpoint, History(tmp_path / "events.jsonl", 10_000))
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        def heard():                                  # the subscription takes a moment to arrive
            pub.emit("upgrade.accepted", tag="v2", height=5)
            return sub.poll(20)
        wait_until(heard, what="the subscriber to hear an event")
        pub.emit("binary.started", name="vega", pid=7, path="/x/vega", args=["node", "--é"])
        sent = []
        while sub.poll(200):
            sent.append(msgpack.unpackb(sub.recv_multipart()[1], raw=False))
        recorded = lines(tmp_path / "events.jsonl")
        assert recorded[-len(sent):] == sent          # the same maps, ts included, bit for bit
        assert [e["seq"] for e in recorded] == list(range(1, len(recorded) + 1))
    finally:
        pub.close()
        ctx.destroy(linger=0)


def emit_n(h: History, n: int, first_seq: int = 1, ts: float = 1000.0) -> list[dict]:
    bodies = [{"v": 1, "type": "rpc.unreachable", "ts": ts + i, "seq": first_seq + i, "attempt": i, "max": 10,
               "error": "x" * 40} for i in range(n)]
    for body in bodies:
        h.append(body)
    return bodies


def test_rotation_keeps_one_older_file_and_bounds_both(tmp_path):
    path = tmp_path / "events.jsonl"
    h = History(path, 1000)
    bodies = emit_n(h, 300)
    h.close()
    older = path.with_name("events.jsonl.1")
    assert older.exists() and not path.with_name("events.jsonl.2").exists()
    assert path.stat().st_size <= 1000 and older.stat().st_size <= 1000
    kept = list(read_history(tmp_path))
    assert kept == bodies[-len(kept):] and len(kept) > 10      # the newest, in order, nothing in between lost


def test_history_survives_a_restart_by_appending(tmp_path):
    path = tmp_path / "events.jsonl"
    first = emit_n(History(path, 10_000), 3)
    second = emit_n(History(path, 10_000), 2, ts=2000.0)        # a new run: seq starts again at 1
    assert list(read_history(tmp_path)) == first + second


def test_since_reads_across_the_rotation(tmp_path):
    h = History(tmp_path / "events.jsonl", 1000)
    bodies = emit_n(h, 12)
    assert lines(tmp_path / "events.jsonl.1")[0] == bodies[0]      # rotated once, after seq 3
    assert list(read_history(tmp_path, since_ts=1003.0)) == bodies[3:]


def test_a_larger_limit_after_a_hot_reload_applies_at_once(tmp_path):
    h = History(tmp_path / "events.jsonl", 300)
    emit_n(h, 5)
    h.max_bytes = 100_000
    emit_n(h, 50)
    assert (tmp_path / "events.jsonl").stat().st_size > 5000


def test_zero_keeps_no_history(tmp_path):
    emit_n(History(tmp_path / "events.jsonl", 0), 3)
    assert not (tmp_path / "events.jsonl").exists()


def test_a_full_disk_costs_the_history_with_one_warning(tmp_path, caplog, monkeypatch):
    path = tmp_path / "events.jsonl"
    path.symlink_to("/dev/full")                 # every write fails with ENOSPC, as on a full disk
    h = History(path, 10_000)
    with caplog.at_level(logging.DEBUG, logger="visor.history"):
        emit_n(h, 5)
        monkeypatch.setattr(history, "RETRY_S", 0.0)      # retried, and failing again, without a word
        emit_n(h, 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert list(read_history(tmp_path)) == []    # /dev/full is no history to read (nor an endless one)


def test_a_history_that_becomes_writable_again_is_resumed(tmp_path, caplog, monkeypatch):
    path = tmp_path / "events.jsonl"
    path.mkdir()                                 # cannot be opened for writing, whoever we are
    h = History(path, 10_000)
    with caplog.at_level(logging.INFO, logger="visor.history"):
        emit_n(h, 2)
        path.rmdir()
        emit_n(h, 1, first_seq=3, ts=1003.0)     # before RETRY_S: not even tried
        assert not path.exists()
        monkeypatch.setattr(history, "RETRY_S", 0.0)
        h._retry_at = 0.0
        later = emit_n(h, 1, first_seq=4, ts=1004.0)
    assert lines(path) == later
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_a_line_cut_short_is_skipped_and_the_next_one_starts_on_its_own_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"v":1,"type":"visor.started","ts":1.0,"seq":1,"pid":1,"home":"/h"}\n{"v":1,"ty')
    bodies = emit_n(History(path, 10_000), 2)
    assert [e["seq"] for e in read_history(tmp_path)] == [1] + [b["seq"] for b in bodies]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "m", "1.5h", "-2h", "2w", "2 hours", "h2"])
def test_a_bad_duration_is_one_clear_error(text):
    with pytest.raises(VisorError, match="not a duration; use a number and a unit: 90s, 15m, 2h or 7d"):
        parse_duration(text)


def test_no_follow_prints_the_history_rendered_or_as_json(tmp_path):
    (tmp_path / ".visor").mkdir()
    bodies = emit_n(History(tmp_path / ".visor" / "events.jsonl", 10_000), 3)
    out = io.StringIO()
    assert print_events(Home(tmp_path), True, None, follow=False, out=out) == 0
    assert [json.loads(line) for line in out.getvalue().splitlines()] == bodies
    out = io.StringIO()
    print_events(Home(tmp_path), False, None, follow=False, out=out)
    assert [line.split()[1:3] for line in out.getvalue().splitlines()] == [["#1", "rpc.unreachable"],
                                                                           ["#2", "rpc.unreachable"],
                                                                           ["#3", "rpc.unreachable"]]


def test_the_cli_without_a_daemon_or_a_history(tmp_path):
    done = run_cli("events", "--home", tmp_path, "--since", "2h", "--no-follow")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    (tmp_path / ".visor").mkdir()
    h = History(tmp_path / ".visor" / "events.jsonl", 10_000)
    old = {"v": 1, "type": "visor.started", "ts": 1000.0, "seq": 1, "pid": os.getpid(), "home": str(tmp_path)}
    h.append(old)
    h.append(recent := {**old, "type": "visor.stopped", "seq": 2, "ts": time.time() - 60})
    done = run_cli("events", "--home", tmp_path, "--since", "15m", "--no-follow", "--json")
    assert done.returncode == 0 and [json.loads(line) for line in done.stdout.splitlines()] == [recent]


def test_the_cli_says_what_is_wrong_with_a_duration_or_a_home(tmp_path):
    done = run_cli("events", "--home", tmp_path, "--since", "yesterday", "--no-follow")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "visor: --since 'yesterday': not a duration; use a number and a unit: 90s, 15m, 2h or 7d\n"
    done = run_cli("events", "--home", tmp_path / "nope", "--no-follow")
    nope = tmp_path / "nope"            # as every other command says it
    assert done.returncode == 1 and done.stderr == f"visor: {nope}: home folder not found " \
                                                   f"(create it with `visor-init --home {nope}`)\n"


class _Dropped:
    def send_multipart(self, *_args, **_kwargs):
        pass                                     # recorded, never sent: what a subscription not yet in effect misses

    def close(self, **_kwargs):
        pass


@pytest.mark.timeout(30)
def test_following_fills_a_gap_in_the_live_stream_from_the_history_and_prints_nothing_twice():
    root = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))     # short: an ipc path
    (root / "config.toml").write_text("")
    (root / ".visor").mkdir()
    ctx = zmq.Context()
    pub = Publisher(ctx, Home(root).endpoint("events"), History(root / ".visor" / "events.jsonl", 1_000_000))
    out = io.StringIO()

    def shown():
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def publish():
        try:
            publish_with_a_gap()
        finally:
            os.kill(os.getpid(), signal.SIGINT)         # ends print_events, in the main thread

    def publish_with_a_gap():
        for n in range(3):
            pub.emit("worker.started", worker="fetcher", pid=n)
        wait_until(lambda: len(shown()) >= 3, what="the history printed")
        live, pub._pub = pub._pub, _Dropped()
        for n in range(3):
            pub.emit("rpc.unreachable", attempt=n, max=10, error="missed")
        pub._pub = live
        wait_until(lambda: pub.emit("upgrade.accepted", tag="v2", height=1) or "v2" in out.getvalue(),
                   what="a live event printed")
        pub.emit("upgrade.ready", tag="v2", height=1)
        wait_until(lambda: len(shown()) == len(list(read_history(root / ".visor"))), what="everything printed")

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=publish)
    thread.start()
    try:
        assert print_events(Home(root), True, 3600, follow=True, out=out) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        thread.join(10)
        history = list(read_history(root / ".visor"))
        pub.close()
        ctx.destroy(linger=0)
        shutil.rmtree(root, ignore_errors=True)
    assert shown() == history and history[-1]["type"] == "upgrade.ready"
    assert [e["error"] for e in history if e["type"] == "rpc.unreachable"] == ["missed"] * 3
