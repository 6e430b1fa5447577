"""Lets a service die with the launcher that started it (`hotslot up`, tests): when HOTSLOT_PARENT_PID is set,
ask the kernel to send SIGTERM when the parent exits, so nothing is left running if the launcher is killed."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "HOTSLOT_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != expected:  # the parent died before we asked: behave as if it had just died
        os.kill(os.getpid(), signal.SIGTERM)
