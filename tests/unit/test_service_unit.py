"""etc/visor.service, checked without systemd: the keys that keep the node alive across a crash of Visor
and still stop everything on `systemctl stop`, and that every command it runs is one `visor` accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from visor.cli import build_parser

UNIT = Path(__file__).resolve().parents[2] / "etc" / "visor.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str                     # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser["Service"]


def command(line: str) -> list[str]:
    argv = shlex.split(line)
    assert Path(argv[0]).name == "visor", line
    return argv[1:]


def test_a_crash_of_visor_leaves_the_node_and_visor_is_restarted():
    s = service()
    assert s["KillMode"] == "process"            # not control-group/mixed: those kill the node with Visor
    assert s["Restart"] in ("on-failure", "always")
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"


def test_every_command_of_the_unit_is_accepted_by_visor_for_the_same_home():
    s = service()
    run, reload_, post = (build_parser().parse_args(command(s[key])) for key in ("ExecStart", "ExecReload",
                                                                                  "ExecStopPost"))
    assert (run.command, reload_.command, post.command) == ("run", "restart", "stop")
    assert run.home == reload_.home == post.home
    assert post.unless_crashed                   # after a crash, the restarted daemon adopts instead
