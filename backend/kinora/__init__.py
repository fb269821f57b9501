"""Kinora: AI video generation jobs, watched live over Server-Sent Events."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kinora")  # one home: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
