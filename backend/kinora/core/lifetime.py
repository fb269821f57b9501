"""A child process that dies with its parent, however the parent ends (SIGKILL, OOM,
a closed terminal): Linux's PR_SET_PDEATHSIG. `kinora up` ties its children to itself
this way, and a worker its pool processes, so nothing is left running as an orphan."""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded at import, in the parent: a forked child should not load libraries.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent(signum: int, parent: int | None = None) -> None:
    """Have the kernel send `signum` to this process when its parent is gone. If the
    parent (`parent`, else the current one) is gone already, exit now: nobody would
    send it."""
    if _libc is None:
        return
    expected = parent if parent is not None else os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != expected or expected == 1:
        os._exit(1)
