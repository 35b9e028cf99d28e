"""Named points where a test kills the process on purpose: DELF_INDEX_CRASH_AT=<name> makes
`reach(name)` SIGKILL its own process there. The chaos test (benchmarks/chaos.py) sends jobs
through every point to prove that a job killed between two steps of a commit loses nothing
committed and leaves nothing half-made. Unset, a point costs one lookup in the environment.

Points: extract:planned, extract:written, extract:committed, build:placed, build:published,
remove:written, remove:committed, compact:written.

`broken(name)` is the other way round: DELF_INDEX_BREAK=<name>[,<name>...] switches off a
guard that a fixed bug lacked, so that the chaos test can show it catches the bug (the
commands are in benchmarks/README.md, "Chaos"). Guards: update-table-check (update checks
the table its index names), append-table-check (an append, a removal with --index, a batch
search and a match check it), known-ids (remove and restore refuse ids the table never held).
"""

import os
import signal


def reach(name):
    if os.environ.get("DELF_INDEX_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def broken(name):
    """Whether the guard `name` is switched off on purpose (never set outside the chaos test)."""
    return name in os.environ.get("DELF_INDEX_BREAK", "").split(",")
