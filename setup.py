"""Metadata is in setup.cfg. This adds one build step: the commit the package is built from is written
into it (visor/BUILD), so `visor version` of an installed copy names its commit."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from visor.build_info import write_stamp  # noqa: E402


class BuildPyWithStamp(build_py):
    def run(self):
        super().run()
        write_stamp(Path(self.build_lib) / "visor", HERE)


class SdistWithStamp(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        write_stamp(Path(base_dir) / "visor", HERE)


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithStamp, "sdist": SdistWithStamp})
