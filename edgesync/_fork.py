"""A fork whose child is its parent's sibling: ``clone(CLONE_PARENT)``, for the mold's births.

design: a worker the mold forks must be the master's child, for the arbiter to reap,
count and signal it. ``os.fork()`` makes it the mold's; the portable way out is a double
fork (mold -> intermediate -> worker: the intermediate exits at once, and the master, a
child subreaper, inherits the worker), which costs a second fork of the whole mold and
the intermediate's exit: 2.1 ms of CPU of the 12.7-13.4 ms a oneshot birth cost
(``bench/births.py perbirth``; 11.5-12.0 ms without it). Linux's ``clone(2)`` with
``CLONE_PARENT`` gives the child the caller's parent in one step.

Python has no ``clone``; ``fork_sibling`` makes it what ``os.fork()`` is
(Modules/posixmodule.c ``os_fork_impl``) for a process that runs one thread:

- ``sys.audit("os.fork")``, then ``PyOS_BeforeFork()`` before the system call and
  ``PyOS_AfterFork_Child()`` / ``PyOS_AfterFork_Parent()`` after it: the interpreter's
  own fork work and every ``os.register_at_fork`` callback;
- the system call as glibc's ``_Fork`` makes it: ``SIGCHLD`` to the parent at exit, and
  ``CLONE_CHILD_SETTID`` on the calling thread's id field in glibc's ``struct pthread``, so
  that glibc in the child knows its own thread id (``pthread_getcpuclockid`` and mutex
  owners read it). glibc does not publish where that field is: ``probe`` finds it, in a
  process whose only thread's id is its pid, as the one int in the first 1 KiB of
  ``struct pthread`` equal to that id;
- the GIL held throughout, as ``os.fork()`` holds it.

What glibc's ``fork()`` does beyond ``_Fork`` is for other threads (locks they may hold)
and for ``pthread_atfork`` handlers, which C libraries register for threads of their own
(OpenBLAS stops its pool). So ``fork_sibling`` declines (returns None) while the process
has more than one thread (``/proc/self/task``): the caller then double-forks with
``os.fork()``, which runs them. Where none of this can be had (not Linux on x86_64 or
aarch64, not glibc, the field not found once), ``probe`` says why.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from typing import Any, Optional

CLONE_PARENT = 0x00008000
CLONE_CHILD_SETTID = 0x01000000
SIGCHLD = 17
#: clone(2)'s system call number and the argument that carries child_tid (x86_64 orders
#: clone's arguments unlike the other architectures: flags, stack, parent_tid, child_tid, tls).
_CLONE = {"x86_64": (56, 3), "aarch64": (220, 4)}
#: How far into glibc's struct pthread (over 1.7 KiB on both architectures) the thread id is looked for.
_SCAN_BYTES = 1024

_syscall: Any = None
_number = 0
_tid_arg = 0
_tid_offset: Optional[int] = None


def probe() -> Optional[str]:
    """Ready ``fork_sibling`` in this process; why it cannot be used here, or None.

    Call it while the process runs one thread whose id is its pid (the mold, before its
    first fork): that is how the thread id's place in glibc's ``struct pthread`` is found.
    """
    global _syscall, _number, _tid_arg, _tid_offset
    if not sys.platform.startswith("linux"):
        return "not Linux"
    machine = platform.machine()
    if machine not in _CLONE:
        return "clone(CLONE_PARENT) is wired for x86_64 and aarch64 only, not %s" % machine
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc_version = ""
    if not libc_version.startswith("glibc"):
        return "not glibc"
    if len(os.listdir("/proc/self/task")) != 1 or os.getpid() != threading.get_native_id():
        return "probed with more than one thread running"
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_void_p
    here = libc.pthread_self()
    words = (ctypes.c_int32 * (_SCAN_BYTES // 4)).from_address(here)
    found = [i * 4 for i, word in enumerate(words) if word == os.getpid()]
    if len(found) != 1:
        return "the thread id field of glibc's struct pthread not found (%d candidates)" % len(found)
    _number, _tid_arg = _CLONE[machine]
    # PyDLL: the call keeps the GIL, as os.fork() does across fork().
    _syscall = ctypes.PyDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [ctypes.c_long, ctypes.c_ulong] + [ctypes.c_void_p] * 4
    _tid_offset = here + found[0]
    return None


def fork_sibling() -> Optional[int]:
    """``os.fork()``, but the child's parent is this process's parent: 0 in the child, its pid here.

    None, having done nothing, if ``probe`` did not succeed or the process now runs more than
    one thread (then use ``os.fork()``). Raises ``OSError`` if the system call failed.
    """
    if _tid_offset is None or len(os.listdir("/proc/self/task")) != 1:
        return None
    args: list[Optional[int]] = [None] * 4
    args[_tid_arg - 1] = _tid_offset
    sys.audit("os.fork")
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _syscall(_number, CLONE_PARENT | CLONE_CHILD_SETTID | SIGCHLD, *args)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(errno, "clone(CLONE_PARENT): %s" % os.strerror(errno))
    return int(pid)

