"""Kinora: AI video generation jobs, watched live over Server-Sent Events."""

__version__ = "0.1.0"
