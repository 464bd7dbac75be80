"""Whether a process id is still alive: the check the broker's record and the demo's children both rely on."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie; reaps it when it is our own exited child (a process this one
    started, such as a broker `llmcf infra up` ran in-process or a demo child, would otherwise linger as a zombie)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: the usual case for a process started by an earlier command
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
