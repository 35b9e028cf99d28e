"""The version of delf-index: recorded in what it writes (run summaries, commits, manifests)."""

__version__ = "0.2.0"
