"""Prefect flows that compose ``pipeline`` into tasks, and the ``nerveseg`` command line."""
