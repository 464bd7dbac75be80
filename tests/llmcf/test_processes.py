"""`pid_alive`: a live process is alive, an exited child is reaped and reported dead, a pid nobody holds is dead."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from llmcf.infra.processes import pid_alive


def test_a_running_child_is_alive_and_an_exited_one_is_reaped_and_dead():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
    finally:
        assert child.stdin is not None
        child.stdin.close()
    deadline = time.monotonic() + 30
    while pid_alive(child.pid):
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    # pid_alive reaped it: nothing is left for waitpid (no zombie lingers).
    try:
        os.waitpid(child.pid, os.WNOHANG)
        reaped_already = False
    except ChildProcessError:
        reaped_already = True
    assert reaped_already


def test_this_process_is_alive_and_a_pid_nobody_holds_is_not():
    assert pid_alive(os.getpid())
    with open("/proc/sys/kernel/pid_max") as limit:
        unused = int(limit.read()) - 1
    assert not os.path.exists(f"/proc/{unused}")
    assert not pid_alive(unused)
