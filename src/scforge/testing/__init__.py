"""Helpers for tests and benchmarks (reference implementations, fixtures). Not part of the user API."""
