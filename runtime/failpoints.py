"""Named points where a test kills the process on purpose: DELF_INDEX_CRASH_AT=<name> makes
`reach(name)` SIGKILL its own process there. The chaos test (benchmarks/chaos.py) sends jobs
through every point to prove that a job killed between two steps of a commit loses nothing
committed and leaves nothing half-made. Unset, a point costs one lookup in the environment.

Points: extract:planned, extract:written, extract:committed, build:placed, build:published,
remove:written, compact:written.
"""

import os
import signal


def reach(name):
    if os.environ.get("DELF_INDEX_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
