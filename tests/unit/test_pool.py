"""The pool's fork hygiene and the subreaper call: the broker's collector keeps working after a fork
(gc.freeze is undone in the parent), and prctl's failure, reported as -1 rather than raised, is seen."""

from __future__ import annotations

import ctypes
import gc
import logging
import signal

import pytest

from visor import binaries, stopper
from visor.pool import Pool

pytestmark = pytest.mark.timeout(20)


def test_the_parent_collects_cyclic_garbage_again_after_a_fork(tmp_path):
    pool = Pool(f"ipc://{tmp_path}/w.sock", str(tmp_path))
    w = pool.spawn("config-watcher")
    try:
        assert gc.get_freeze_count() == 0
    finally:
        signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)
        stopper.wait_ended([stopper.Proc(w.pid, w.pidfd)], 5)
        assert pool.reap(w, 0.0) == -signal.SIGKILL


def test_a_refused_prctl_is_a_warning_naming_the_reason(monkeypatch, caplog):
    class Libc:
        def prctl(self, *args):
            ctypes.set_errno(1)                  # EPERM, as a seccomp filter or an old kernel answers
            return -1
    monkeypatch.setattr(binaries.ctypes, "CDLL", lambda *a, **k: Libc())
    with caplog.at_level(logging.WARNING, logger="visor"):
        binaries.become_subreaper()
    assert "cannot become a child subreaper (Operation not permitted)" in caplog.text
