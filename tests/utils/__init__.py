"""Helpers of the tests (no test module imports another; fixtures live in conftest)."""
