"""visor.linux: the rename that never replaces, the kernel check."""

import os

import pytest

from visor.cli import main
from visor.errors import VisorError
from visor.linux import rename_noreplace, require_kernel


def test_rename_noreplace_moves_a_folder_where_nothing_is(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("x")
    rename_noreplace(tmp_path / "new", tmp_path / "v1")
    assert (tmp_path / "v1" / "f").read_text() == "x" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("there", ["empty folder", "file", "dangling link"])
def test_rename_noreplace_never_replaces_what_is_there(tmp_path, there):
    (tmp_path / "new").mkdir()
    target = tmp_path / "v1"
    if there == "empty folder":
        target.mkdir()                       # os.rename would silently replace this one
    elif there == "file":
        target.write_text("mine")
    else:
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "new", target)
    assert (tmp_path / "new").is_dir() and target.is_symlink() == (there == "dangling link")
    assert there != "empty folder" or not list(target.iterdir())


@pytest.mark.parametrize("release, ok", [("5.3.0", True), ("6.8.0-45-generic", True), ("5.15.167.4-microsoft", True),
                                         ("5.2.21", False), ("4.18.0-553.el8_10.x86_64", False), ("custom", True)])
def test_require_kernel_refuses_a_kernel_without_pidfds_in_one_line(release, ok):
    if ok:
        require_kernel((5, 3), release)
    else:
        with pytest.raises(VisorError) as err:
            require_kernel((5, 3), release)
        assert str(err.value) == f"Linux {release}: Visor needs Linux 5.3 or later (it watches processes through pidfds)"


def test_visor_run_checks_the_kernel_first(tmp_path, monkeypatch, capsys):
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: type(real)((*real[:2], "4.19.0-26-amd64", *real[3:])))
    assert main(["run", "--home", str(tmp_path / "no-home")]) == 1
    assert capsys.readouterr().err == ("visor: Linux 4.19.0-26-amd64: Visor needs Linux 5.3 or later "
                                       "(it watches processes through pidfds)\n")
