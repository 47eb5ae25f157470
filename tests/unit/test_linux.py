"""visor.linux: the rename that never replaces."""

import pytest

from visor.linux import rename_noreplace


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
