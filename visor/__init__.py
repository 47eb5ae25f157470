"""Visor: runs the binaries of a Vega node and carries them through protocol upgrades."""

__version__ = "0.1.0"
