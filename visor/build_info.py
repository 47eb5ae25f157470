"""Which commit this copy of Visor was built from: a stamp written at build time, else the checkout's.

Owns reading a git checkout's HEAD without running git (a plain clone or a `git worktree`), and the
stamp file visor/BUILD that setup.py writes into every built package (wheel, sdist), so an installed
copy knows its commit. It imports nothing of Visor: setup.py uses it before Visor is installed.
"""

from __future__ import annotations

from pathlib import Path

STAMP_NAME = "BUILD"
CHECKOUT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The stamp's commit in a built copy; the checkout's when run from one (or installed editable)."""
    try:
        return (Path(__file__).with_name(STAMP_NAME).read_text().strip() or "unknown")
    except FileNotFoundError:
        return commit_of(CHECKOUT)


def commit_of(checkout: Path) -> str:
    """HEAD's commit of the git checkout at `checkout`; "unknown" when it is none."""
    git = checkout / ".git"
    try:
        if git.is_file():                    # a worktree: "gitdir: <its folder in the main .git>"
            git = checkout / git.read_text().strip().removeprefix("gitdir: ")
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head                      # detached
        ref = head.removeprefix("ref: ")
        if (common / ref).is_file():
            return (common / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def write_stamp(package_dir: Path, checkout: Path) -> None:
    """The build step (setup.py): the checkout's commit into package_dir/BUILD. Without a .git (building
    from an sdist, which carries its own stamp) whatever stamp is there stays."""
    if (found := commit_of(checkout)) != "unknown":
        package_dir.mkdir(parents=True, exist_ok=True)
        (package_dir / STAMP_NAME).write_text(found + "\n")
