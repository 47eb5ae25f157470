"""etc/hooks/backup and etc/hooks/notify, run as Visor runs a hook: the VISOR_* environment, a temp
folder, and a webhook on 127.0.0.1 (never the network)."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

HOOKS = Path(__file__).resolve().parents[2] / "etc" / "hooks"


def hook_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("VISOR_")}
    return {**env, "VISOR_HOOK": "afterStop", "VISOR_HOME": str(tmp_path / "home"), "VISOR_UPGRADE_TAG": "v0.73.0",
            "VISOR_UPGRADE_HEIGHT": "120", "VISOR_FROM_FOLDER": str(tmp_path / "home" / "genesis"),
            "VISOR_TO_FOLDER": str(tmp_path / "home" / "v0.73.0"), **extra}


def run(hook: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(HOOKS / hook), *args], env=env, capture_output=True, text=True, timeout=20)


@pytest.fixture
def state(tmp_path):
    src = tmp_path / "state"
    (src / "snapshots").mkdir(parents=True)
    (src / "snapshots" / "block.db").write_bytes(os.urandom(4096))
    (src / "latest").symlink_to("snapshots/block.db")
    return src


def test_the_examples_are_executable():
    assert all(os.access(HOOKS / name, os.X_OK) for name in ("backup", "notify"))


def test_backup_copies_the_state_folder_into_a_folder_named_after_the_upgrade(tmp_path, state):
    done = run("backup", "--source", str(state), "--dest-root", str(tmp_path / "backups"), env=hook_env(tmp_path))
    assert done.returncode == 0, done.stderr
    copy = Path(done.stdout.strip())
    assert copy.parent == tmp_path / "backups" and re.fullmatch(r"v0\.73\.0-h120-\d{8}T\d{6}Z", copy.name)
    assert (copy / "snapshots" / "block.db").read_bytes() == (state / "snapshots" / "block.db").read_bytes()
    assert os.readlink(copy / "latest") == "snapshots/block.db"          # cp -a: links stay links
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [copy.name]   # no .partial left


def test_backup_reads_its_folders_from_the_environment_and_can_write_a_tar(tmp_path, state):
    env = hook_env(tmp_path, VISOR_BACKUP_SOURCE=str(state))
    done = run("backup", "--tar", env=env)                  # dest root defaults to VISOR_HOME/backups
    assert done.returncode == 0, done.stderr
    tar = Path(done.stdout.strip())
    assert tar.parent == tmp_path / "home" / "backups" and tar.name.endswith(".tar")
    with tarfile.open(tar) as archive:
        assert {"state/snapshots/block.db", "state/latest"} <= set(archive.getnames())


@pytest.mark.parametrize("args, message", [
    ([], "backup: no source folder: give --source DIR or set VISOR_BACKUP_SOURCE"),
    (["--source", "/nonexistent/state"], "backup: source /nonexistent/state is not a folder"),
])
def test_backup_fails_with_one_line(tmp_path, args, message):
    done = run("backup", *args, env=hook_env(tmp_path))
    assert done.returncode == 1 and done.stderr.strip() == message and done.stdout == ""


class Webhook(http.server.ThreadingHTTPServer):
    """Records what is posted; answers `status`, or nothing until released (to test the timeout)."""

    def __init__(self, status: int = 204):
        self.posts: list[dict] = []
        self.status, self.hold = status, threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hold.set()
        self.shutdown()
        self.server_close()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append({"path": self.path, "type": self.headers["Content-Type"], "body": json.loads(body)})
        if self.server.status == 0:
            self.server.hold.wait(10)
            return
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook(request):
    server = Webhook(getattr(request, "param", 204))
    yield server
    server.close()


def test_notify_posts_the_upgrade_to_the_webhook(tmp_path, webhook):
    done = run("notify", webhook.url, env=hook_env(tmp_path, VISOR_HOOK="afterStart"))
    assert done.returncode == 0, done.stderr
    home = str(tmp_path / "home")
    assert webhook.posts == [{"path": "/hook", "type": "application/json", "body": {
        "tag": "v0.73.0", "height": 120, "hook": "afterStart", "home": home,
        "from": f"{home}/genesis", "to": f"{home}/v0.73.0"}}]


@pytest.mark.parametrize("webhook", [500], indirect=True)
def test_notify_fails_with_one_line_when_the_webhook_says_no(tmp_path, webhook):
    done = run("notify", webhook.url, env=hook_env(tmp_path))
    assert done.returncode == 1 and done.stderr.strip() == f"notify: {webhook.url} answered 500 Internal Server Error"


@pytest.mark.parametrize("webhook", [0], indirect=True)
def test_notify_gives_up_at_its_timeout(tmp_path, webhook):
    done = run("notify", webhook.url, "--timeout", "0.5", env=hook_env(tmp_path))
    assert done.returncode == 1 and done.stderr.strip() == f"notify: cannot post to {webhook.url}: timed out"


def test_notify_fails_with_one_line_when_nothing_listens(tmp_path, webhook):
    url = webhook.url
    webhook.close()                                          # the port is free again: refused
    done = run("notify", url, env=hook_env(tmp_path))
    assert done.returncode == 1 and done.stderr.startswith(f"notify: cannot post to {url}: ")
    assert done.stderr.count("\n") == 1
