"""visor.build_info: the commit of a built copy (its stamp) or of a checkout (its .git, read without git)."""

import subprocess
import sys

import pytest

import visor.build_info
from tests.helpers import REPO
from visor.build_info import commit, commit_of, write_stamp

A, B, C = "a" * 40, "b" * 40, "c" * 40


def make_git(root, head: str, loose: dict | None = None, packed: dict | None = None):
    (root / ".git" / "refs" / "heads").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text(head + "\n")
    for ref, sha in (loose or {}).items():
        (root / ".git" / ref).write_text(sha + "\n")
    if packed:
        (root / ".git" / "packed-refs").write_text("# pack-refs with: peeled fully-peeled sorted\n" + "".join(
            f"{sha} {ref}\n" for ref, sha in packed.items()))
    return root


def test_a_checkout_is_read_through_loose_and_packed_refs_and_a_detached_head(tmp_path):
    assert commit_of(make_git(tmp_path / "1", "ref: refs/heads/main", loose={"refs/heads/main": A})) == A
    assert commit_of(make_git(tmp_path / "2", "ref: refs/heads/main", packed={"refs/heads/main": B})) == B
    assert commit_of(make_git(tmp_path / "3", C)) == C
    assert commit_of(tmp_path / "no-git") == "unknown"


def test_a_worktree_is_read_through_its_gitdir_and_the_common_refs(tmp_path):
    main = make_git(tmp_path / "main", "ref: refs/heads/main", packed={"refs/heads/topic": B})
    private = main / ".git" / "worktrees" / "wt"
    private.mkdir(parents=True)
    (private / "HEAD").write_text("ref: refs/heads/topic\n")
    (private / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {private}\n")
    assert commit_of(tmp_path / "wt") == B


def test_a_built_copy_reads_its_stamp_and_a_checkout_its_git(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "visor"
    write_stamp(package, make_git(tmp_path / "src", C))
    monkeypatch.setattr(visor.build_info, "__file__", str(package / "build_info.py"))
    assert commit() == C                                 # installed: the stamp, with no checkout near it
    write_stamp(package, tmp_path / "unpacked-sdist")     # no .git: the stamp it carries stays
    assert commit() == C
    monkeypatch.setattr(visor.build_info, "__file__", str(tmp_path / "nowhere" / "build_info.py"))
    monkeypatch.setattr(visor.build_info, "CHECKOUT", tmp_path / "src")
    assert commit() == C                                 # no stamp (run in place, editable): the checkout


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout to build from")
def test_the_build_step_stamps_the_package_with_the_checkouts_commit(tmp_path):
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "visor" / "BUILD").read_text().strip() == commit_of(REPO) != "unknown"
