"""Births from a mold: one process per code generation imports the app once, and forks the workers.

design: without ``--preload`` every gunicorn worker imports the app itself (about 120 ms
of CPU for a Flask app), and with it every worker is forked from a master that never
ran the app (cold caches, copy-on-write faults on its first requests). A mold is a
child of the master that imports the app (``app.wsgi()``, what ``--preload`` does in
the master), collects and freezes its heap (``gc.collect(); gc.freeze()``; on CPython
3.12+ its objects are made immortal first, ``_heap``), starts no thread, and then forks
every worker of its generation on the master's request. Its workers report, at their
exit, the standard-library modules they imported after their birth, and it imports
them too (``_learn``): later workers start with them.

gunicorn stays in charge. The master (``_gunicorn.arbiter.Master.spawn_worker``) still
builds each worker's ``Worker`` object, runs ``pre_fork``, and records the worker in
``WORKERS``; only the ``fork`` is the mold's. The mold forks each worker as the master's
own child, in one step (``clone(CLONE_PARENT)``, ``_fork``), or where that cannot be had,
by a double fork (mold -> intermediate -> worker, the intermediate exits at once, and the
master is a child subreaper, ``prctl(PR_SET_CHILD_SUBREAPER)``). Either way the worker is
the master's child: the arbiter reaps it, counts it, times it out through its
heartbeat file (sent to the mold with ``SCM_RIGHTS``) and signals it as any other.
The worker runs gunicorn's child half of ``spawn_worker`` (``_gunicorn.child.run_worker``,
a mirror of it: "Booting worker", ``post_fork``, ``init_process``, ``worker_exit``); every
contact with the arbiter's internals is in ``_gunicorn.child``.

Rule: one mold per generation, and a generation is the arbiter's config object (a
HUP builds a new one) or, under ``policy = "oneshot"`` without ``--preload``, the
app's source files on disk: before each fork the mold compares their stat with its
import's, and a change starts a new generation. A new generation's mold whose import fails is refused: the
traceback is logged once, births go on from the previous generation's mold (the old
code keeps serving), and the next HUP tries again. No mold at all (the first
generation failed, the mold died and its successor failed, the app's import started
a thread, ``mold = false``, ``--reload``, not Linux): births are gunicorn's own.

Fork safety: a mold never forks with a thread running. If the app's import starts
one, the mold reports which and exits; births fall back to gunicorn's (logged once,
with how to fix). The mold dies with the master (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import importlib
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, FrozenSet, List, NoReturn, Optional, Set, Tuple, Union

from . import _fork, _heap

# The mold and a worker it forks, until gunicorn's init_process, log through the arbiter's
# logger (arbiter.log): the edgesync logger has no handler there (Worker._attach_logging).

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_SET_CHILD_SUBREAPER = 36
#: Longest the master waits for a mold's import (blocking its loop, as a --preload reload does).
READY_TIMEOUT = 60.0
#: Longest the master waits for the pid of a worker the mold forks.
FORK_TIMEOUT = 15.0
#: Longest a new worker waits to become the master's child (its intermediate's exit).
REPARENT_TIMEOUT = 5.0
#: worker age, record slot (-1: none), max_requests, check the code on disk (0/1), a code signature to
#: fork anyway (its import failed already)
_REQUEST = struct.Struct("=qqqqq")

_libc: Any = None
#: In a mold and its workers: which loggers were disabled just before the app's import and just after
#: it (a Django LOGGING with disable_existing_loggers disables gunicorn's own).
_loggers_before: Dict[str, bool] = {}
_loggers_after: Dict[str, bool] = {}
#: In a mold and its workers: the modules the mold had when it last froze its heap.
_mold_modules: FrozenSet[str] = frozenset()
#: In a mold's worker: where it tells the mold which standard-library modules it imported (see _learn).
_learned_to: Optional[socket.socket] = None
#: Most module names a mold imports from its workers' reports per generation.
LEARN_MAX = 1000
_stdlib_roots: Tuple[str, ...] = ()
#: Standard-library modules whose import does something (prints, opens a web browser): never learned.
_NOT_LEARNED = frozenset({"antigravity", "this"})


def _prctl(option: int, arg: int, probe: bool = False) -> bool:
    """``prctl(option, arg)`` on Linux; with ``probe``, only whether libc's prctl can be called."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return probe or bool(_libc.prctl(option, arg, 0, 0, 0) == 0)


def _name(name: bytes) -> bytes:
    """Set this process's name (``/proc/self/comm``); returns the one it had."""
    if not _prctl(PR_SET_NAME, 0, probe=True):
        return b""
    before = ctypes.create_string_buffer(16)
    _libc.prctl(PR_GET_NAME, before, 0, 0, 0)
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    return before.value


def unavailable(arbiter: Any, enabled: bool) -> Optional[str]:
    """Why births cannot come from a mold here, or None if they can."""
    if not enabled:
        return "mold = false"
    if not sys.platform.startswith("linux"):
        return "not Linux (a mold needs PR_SET_CHILD_SUBREAPER)"
    if arbiter.cfg.reload:
        return "--reload (each worker watches the code it imported itself)"
    if not hasattr(socket, "send_fds"):
        return "no socket.send_fds"
    return None


class Mold:
    """The master's handle on one mold process."""

    def __init__(self, arbiter: Any, cfg: Any, pid: int, sock: socket.socket):
        self.arbiter = arbiter
        self.cfg = cfg
        self.pid = pid
        self.sock = sock
        self.loaded = ""  # what its import and the app's warm-up took, for the log

    @classmethod
    def start(cls, arbiter: Any, immortal_heap: bool = False) -> tuple[Optional[Mold], str, str]:
        """Fork a mold for the arbiter's current config and wait until it is ready (``immortal_heap``: see
        ``_heap.freeze``).

        Returns ``(mold, "", "")`` or ``(None, kind, detail)`` with kind ``"threads"``
        (detail: their names), ``"error"`` (the traceback) or ``"gone"``.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master = os.getpid()
        pid = os.fork()
        if pid == 0:  # the mold
            try:
                ours.close()
                _mold_main(arbiter, theirs, master, immortal_heap)
            finally:
                os._exit(1)
        theirs.close()
        mold = cls(arbiter, arbiter.cfg, pid, ours)
        reply = mold._receive(READY_TIMEOUT)
        if reply is not None and reply.startswith(b"ready:"):
            imported, warmed, heap, double_fork = reply[6:].decode(errors="replace").split(":", 3)
            mold.loaded = "imported in %.2fs, warmed up in %.2fs; %s%s" % (
                float(imported), float(warmed), heap + "; " if heap else "",
                "each worker forked through an intermediate: " + double_fork if double_fork
                else "each worker forked in one step")
            return mold, "", ""
        mold.stop()
        if reply is None:
            return None, "gone", "no answer within %.0fs" % READY_TIMEOUT
        kind, _, detail = reply.decode(errors="replace").partition(":")
        return None, kind, detail

    def _receive(self, timeout: float) -> Optional[bytes]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        try:
            data = self.sock.recv(65536)
        except OSError:
            return None
        return data or None

    def fork(self, worker: Any, slot: Optional[int], check: bool = False,
             skip: int = 0) -> Union[int, bytes, str, None]:
        """Have the mold fork ``worker`` (built in the master): its pid (the master's child by now), None if
        the mold is gone, (``check``) the signature of the code on disk as bytes if it changed since the
        mold's import (and is not ``skip``), or, as a str, the threads that make it refuse to fork."""
        request = _REQUEST.pack(worker.age, -1 if slot is None else slot, min(int(worker.max_requests), 2**62),
                                int(check), skip)
        try:
            socket.send_fds(self.sock, [request], [worker.tmp.fileno()])
        except OSError:
            return None
        reply = self._receive(FORK_TIMEOUT)
        if reply is not None and reply.startswith(b"stale:"):
            return reply[6:]
        if reply is not None and reply.startswith(b"threads:"):
            return reply[8:].decode(errors="replace")
        if reply is None or not reply.isdigit():
            return None
        return int(reply)

    def stop(self) -> None:
        """End the mold (it holds no worker: each one is the master's child)."""
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass  # gone already; the arbiter reaps it as an unknown child


# -- in the mold ----------------------------------------------------------------------


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data[:60000])
    except OSError:
        os._exit(1)


def _mold_main(arbiter: Any, sock: socket.socket, master: int, immortal_heap: bool) -> NoReturn:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != master:
        os._exit(0)
    from ._gunicorn import child

    child.become_mold(arbiter)  # none of the arbiter's signal handlers, workers' heartbeat files
    # Ctrl-C reaches the whole process group: the master handles it, and ends us.
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    # What ps -o comm and psutil's name() show, whatever is installed; its workers take the master's back.
    master_name = _name(b"edgesync-mold")
    from . import _births, _process

    _process.set_mold(True)  # a wait_until at import is refused here, as in the master
    global _loggers_before, _loggers_after
    _loggers_before = _logger_flags()
    try:
        child.rehearse(arbiter.cfg)
    # why Exception: a request this configuration refuses costs the workers warm code, nothing else.
    except Exception as exc:
        arbiter.log.info("edgesync: mold %d: no rehearsed request (%s: %s); each worker warms gunicorn's request "
                         "code itself", os.getpid(), type(exc).__name__, exc)
    try:
        started = time.monotonic()
        child.load_app(arbiter)  # the app's import (done already in the master with --preload)
        imported = time.monotonic()
        _births.warm()  # the app's warm-up functions (the master ran them already with --preload)
        timing = b"ready:%.3f:%.3f" % (imported - started, time.monotonic() - imported)
    except BaseException:
        # why BaseException: whatever the import raised, the mold reports it and ends; the master decides.
        if _process.mold_refusal() is None:
            _send(sock, b"error:" + traceback.format_exc().encode())
            os._exit(1)
    refused = _process.mold_refusal()
    if refused is not None:  # raised, or caught by the app: either way its workers must schedule it
        _send(sock, b"wait_until:" + refused.encode())
        os._exit(0)
    others = _other_threads()
    if others:
        names = ", ".join("%s (target %s)" % (t.name, getattr(getattr(t, "_target", None), "__qualname__", "?"))
                          for t in others)
        _send(sock, b"threads:" + names.encode())
        os._exit(0)
    # What the import made lives as long as the generation: out of every worker's
    # collections, and on pages the workers share and never write.
    _loggers_after = _logger_flags()
    files = _app_files()
    imported_code = _signature(files)
    # Its workers tell it which standard-library modules they imported after the fork (_learn).
    learned, learned_to = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    learned.setblocking(False)
    learned_to.setblocking(False)
    global _learned_to, _mold_modules
    _learned_to = learned_to
    _stdlib_dirs()
    imported_since: Set[str] = set()
    threads_from = ""  # what a learned import started: the next fork request is refused
    # Why workers cannot be forked in one step here (then each goes through an intermediate).
    double_fork = _fork.probe()
    _mold_modules = frozenset(sys.modules)
    heap = _heap.freeze(immortal_heap)
    _send(sock, b"%s:%s:%s" % (timing, heap.encode(), (double_fork or "").encode()))
    while True:
        try:
            readable = select.select([sock, learned], [], [])[0]
        except InterruptedError:
            continue
        if learned in readable:
            threads_from = threads_from or _learn(learned, imported_since, immortal_heap)
            if sock not in readable:
                continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 1)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # the master closed its end: a new generation, or it is gone
        age, slot, max_requests, check, skip = _REQUEST.unpack(msg)
        if threads_from:
            for fd in fds:
                os.close(fd)
            _send(sock, b"threads:" + threads_from.encode())
            os._exit(0)
        if check:
            now = _signature(files)
            if now not in (imported_code, skip):
                now = _settled(files, now)
            if now not in (imported_code, skip):
                for fd in fds:
                    os.close(fd)
                _send(sock, b"stale:%d" % now)
                continue
        # What the process that becomes the worker runs (it never returns).
        become_worker = functools.partial(_worker_main, arbiter, master, age, None if slot < 0 else slot,
                                          max_requests, fds[0], (sock, learned))

        worker_pid: Optional[int] = None
        if double_fork is None:
            try:
                worker_pid = _fork.fork_sibling()  # None while a C library runs a thread here
            except OSError as exc:  # refused here (a seccomp filter, say): double forks from now on
                double_fork = str(exc.strerror or exc)  # "clone(CLONE_PARENT): <why>"
                arbiter.log.warning("edgesync: mold %d: %s; forking each worker through an intermediate process",
                                    os.getpid(), double_fork)
        if worker_pid == 0:  # one fork: the worker, the master's child already
            _name(master_name)
            become_worker()
        intermediate = 0
        if worker_pid is None:
            intermediate = os.fork()
            if intermediate == 0:  # forks the worker and exits, so that it becomes the master's child
                _name(master_name)  # before the worker exists: the master never has a worker with the mold's name
                worker_pid = os.fork()
                if worker_pid == 0:
                    become_worker()
                _reply(sock, worker_pid)
                os._exit(0)
        else:
            _reply(sock, worker_pid)
        for fd in fds:
            os.close(fd)
        if intermediate:
            os.waitpid(intermediate, 0)


def _reply(sock: socket.socket, worker_pid: int) -> None:
    """Tell the master the pid of the worker just forked; if it gave up on this mold, the worker and the
    process replying end (it would never know that worker)."""
    try:
        sock.send(b"%d" % worker_pid)
    except OSError:
        os.kill(worker_pid, signal.SIGKILL)
        os._exit(1)


def _learn(learned: socket.socket, imported_since: Set[str], immortal_heap: bool) -> str:
    """In the mold: import the standard-library modules its workers reported, so later workers start with them.

    What a worker imports after its birth (a lazily imported codec, ``json``, ``email``...)
    costs every worker its import, on pages it copies. A worker reports, at its exit, the
    standard-library modules it imported that the mold had not (``_report_imports``); the
    mold imports them, at most ``LEARN_MAX`` per generation, and freezes its heap again.
    Only the standard library's: importing it starts no thread and opens nothing a worker
    would then share, where an app's own module may. A module whose import fails is
    skipped. Returns what a learned import started (the thread names, if any): the mold
    then forks no more.
    """
    names: Set[str] = set()
    while True:
        try:
            names.update(learned.recv(65536).decode(errors="replace").split())
        except (BlockingIOError, InterruptedError):
            break
    # Parents before their submodules; none the mold has, none outside the standard library.
    for name in sorted(names - sys.modules.keys(), key=lambda n: (n.count("."), n)):
        if len(imported_since) >= LEARN_MAX:
            break
        if not _stdlib_name(name):
            continue
        imported_since.add(name)
        try:
            importlib.import_module(name)
        except Exception:  # this Python lacks it, or it needs what the worker had: the workers import it
            pass
        others = _other_threads()
        if others:
            return "importing %s (learned from a worker) started %s" % (name, ", ".join(t.name for t in others))
    global _mold_modules
    _mold_modules = frozenset(sys.modules)
    _heap.freeze(immortal_heap)
    return ""


def _report_imports() -> None:
    """In a mold's worker, at its exit: tell the mold which standard-library modules it imported (see _learn)."""
    # Every module name, and module, this reads is written to (its reference count) on pages the
    # worker shares with the mold: a worker that imported nothing reads none of them.
    if _learned_to is None or len(sys.modules) == len(_mold_modules):
        return
    new = [name for name in list(sys.modules) if name not in _mold_modules]
    new = [name for name in new if _stdlib(name, sys.modules.get(name))]
    if new:
        try:
            _learned_to.send(" ".join(new).encode()[:60000])
        except OSError:  # the mold is gone, or its queue is full: the next worker reports them
            pass


def _stdlib(name: str, module: object) -> bool:
    """Whether ``module`` is the standard library's ``name``: by its name, and by its file (an app's own
    module may take a standard-library name)."""
    if not _stdlib_name(name):
        return False
    path = getattr(module, "__file__", None)
    if not isinstance(path, str):
        return True  # built into the interpreter
    # No realpath here: each code path a worker runs for the first time copies pages. A path
    # through a link the directories below do not name is not learned (the workers import it).
    return path.startswith(_stdlib_dirs()) and "site-packages" not in path.split(os.sep)


def _stdlib_name(name: str) -> bool:
    """Whether ``name`` is a standard-library module's name that may be learned (``_NOT_LEARNED`` may not)."""
    top = name.partition(".")[0]
    return top in sys.stdlib_module_names and top not in _NOT_LEARNED


def _other_threads() -> List[threading.Thread]:
    """The Python threads running besides the main one (a mold forks with none)."""
    return [t for t in threading.enumerate() if t is not threading.main_thread()]


def _stdlib_dirs() -> Tuple[str, ...]:
    """The standard library's directory (``os``'s, ``lib-dynload`` below it), as named and resolved."""
    global _stdlib_roots
    if not _stdlib_roots:
        here = os.path.dirname(os.__file__)
        _stdlib_roots = tuple({os.path.join(here, ""), os.path.join(os.path.realpath(here), "")})
    return _stdlib_roots


def _app_files() -> List[str]:
    """The source files of the modules imported from outside Python's and the environment's own trees."""
    roots = tuple({os.path.join(os.path.realpath(p), "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py") and not os.path.realpath(path).startswith(roots):
            files.add(path)
    return sorted(files)


def _signature(files: List[str]) -> int:
    """One number that changes when any of ``files`` changes (modified, replaced or removed)."""
    stamps = []
    for path in files:
        try:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((0, 0, 0))
    return hash(tuple(stamps)) & (2**62 - 1)


def _logger_flags() -> Dict[str, bool]:
    return {name: lg.disabled for name, lg in logging.root.manager.loggerDict.items()
            if isinstance(lg, logging.Logger)}


def _set_logger_flags(flags: Dict[str, bool]) -> None:
    for name, disabled in flags.items():
        lg = logging.root.manager.loggerDict.get(name)
        if isinstance(lg, logging.Logger):
            lg.disabled = disabled


def app_loaded() -> None:
    """In a worker a mold forked, once gunicorn's ``load_wsgi`` has run: the loggers as the app's import left them.

    Until then (``_worker_main``) they are as before the import, as in a worker that imports
    the app itself: gunicorn's "Booting worker" and the ``post_fork`` hook come before it.
    """
    if _loggers_before != _loggers_after:
        _set_logger_flags(_loggers_after)


def _settled(files: List[str], now: int) -> int:
    """The signature of ``files`` once it holds for 50 ms (at most 1 s): a save may truncate, then write,
    and a signature taken in between would be refused or imported apart from the one after it."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = _signature(files)
        if again == now:
            break
        now = again
    return now


def _worker_main(arbiter: Any, master: int, age: int, slot: Optional[int], max_requests: int,
                 heartbeat_fd: int, molds: Tuple[socket.socket, ...]) -> NoReturn:
    from . import _process, _recycle
    from ._gunicorn import child

    for sock in molds:  # the mold's sockets: the worker's own is _learned_to
        sock.close()

    _process.set_mold(False)
    # Set only if the import changed them (each logger touched is a page the worker copies).
    if _loggers_before != _loggers_after:
        _set_logger_flags(_loggers_before)
    atexit.register(_report_imports)  # edgesync's exit (_exit.leave) runs the atexit callbacks
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != master:  # forked through an intermediate: until it has exited
        if time.monotonic() >= deadline:
            os._exit(0)  # the master is gone
        time.sleep(0.0002)
    _recycle.adopt(slot)
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        worker = child.new_worker(arbiter, master, age, max_requests, heartbeat_fd)
    except BaseException:
        arbiter.log.exception("edgesync: a worker forked by the mold could not be set up")
        os._exit(1)
    child.run_worker(arbiter, worker)


def become_subreaper() -> bool:
    """In the master: orphans of its descendants (the mold's workers) become its children."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


class Molds:
    """In the master: the current generation's mold, started, replaced and given up as the rules say."""

    def __init__(self, arbiter: Any, enabled: bool, glog: Any, code_generations: bool = False,
                 before_start: Optional[Callable[[], object]] = None, immortal_heap: bool = False):
        self.arbiter = arbiter
        self.immortal_heap = immortal_heap  # a mold makes its heap immortal (_heap) before it forks
        # What the master does before a new generation's mold forks from it (the worker class reads
        # its settings again after a HUP, so that the mold's workers start from them).
        self.before_start = before_start
        self.enabled = enabled
        # oneshot without --preload: a change to the app's source files starts a new generation.
        self.code_generations = code_generations
        self.refused_code = 0  # the signature of the code on disk whose import failed
        self.glog = glog
        self.current: Optional[Mold] = None
        self.refused_cfg: Any = None  # the config whose mold failed to import
        self.disabled = ""  # why births came back to gunicorn's for good (an import that starts threads)
        self.subreaper = False
        self._said_off = ""
        self.dead: Optional[Tuple[Any, int]] = None  # the config and pid of a mold that died, until a successor

    def _off(self) -> Optional[str]:
        why = self.disabled or unavailable(self.arbiter, self.enabled)
        if why is None and not self.subreaper:
            self.subreaper = become_subreaper()
            if not self.subreaper:
                why = "prctl(PR_SET_CHILD_SUBREAPER) failed"
        if why and why != self._said_off:
            self._said_off = why
            if why == self.disabled:
                return why  # logged with its details already
            self.glog.info("edgesync: workers are forked by the master, not by a mold (%s)", why)
        return why

    def get(self) -> Optional[Mold]:
        """The mold to fork the next worker from, or None: gunicorn's own birth."""
        if self._off():
            self.stop()
            return None
        cfg = self.arbiter.cfg
        cur = self.current
        if (cur is not None and cur.cfg is cfg) or cfg is self.refused_cfg:
            return cur
        if self.before_start is not None:
            self.before_start()
        new, kind, detail = Mold.start(self.arbiter, self.immortal_heap)
        if new is not None:
            dead = self.dead[1] if self.dead is not None and self.dead[0] is cfg else 0
            self.glog.info("edgesync: mold %d ready for %s (%s)%s", new.pid,
                           "a new generation" if cur is not None else
                           "the same generation, in place of mold %d" % dead if dead else "the first generation",
                           new.loaded, "; the previous one ends" if cur is not None else "")
            self.dead = None
            if cur is not None:
                cur.stop()
            self.current = new
            return new
        if kind in ("threads", "wait_until"):
            self._give_up(kind, detail)
            return None
        self.refused_cfg = cfg
        if cur is None:
            self.glog.error("edgesync: the mold could not import the app (%s); workers are forked by the master "
                            "as gunicorn does:\n%s", kind, detail)
            return None
        self.glog.error("edgesync: the new code's mold could not import the app (%s); this generation is refused "
                        "and the previous code keeps serving (its mold forks the workers) until the next HUP:"
                        "\n%s", kind, detail)
        return cur

    def fork(self, worker: Any, slot: Optional[int], refork: Callable[[], object]) -> Optional[int]:
        """Fork ``worker`` from the current generation's mold; None if no mold could (gunicorn's birth then).

        ``refork`` runs as soon as a mold dies on the way, before ``worker`` is forked again, by another mold
        or, when this returns None, by the master (the dead mold may have forked one already, which the
        master never hears of: ``_recycle.stranger``)."""
        mold = self.get()
        for _ in range(3):
            if mold is None:
                return None
            check = self.code_generations and not self.arbiter.cfg.preload_app
            reply = mold.fork(worker, slot, check, self.refused_code)
            if isinstance(reply, int):
                return reply
            if isinstance(reply, str):  # a module it imported from its workers' reports started a thread
                self._give_up("threads", reply)
                return None
            if reply is None:
                self.lost(mold)
                refork()
                mold = self.get()
            else:
                mold = self._renew(mold, int(reply))
        return None

    def _renew(self, old: Mold, code: int) -> Optional[Mold]:
        """The app's source changed on disk (oneshot): a new generation from it, or ``old`` if its import fails."""
        new, kind, detail = Mold.start(self.arbiter, self.immortal_heap)
        if new is not None:
            self.glog.info("edgesync: the app's source changed: mold %d ready for a new generation (%s); the "
                           "previous one ends", new.pid, new.loaded)
            old.stop()
            self.current = new
            return new
        if kind in ("threads", "wait_until"):
            self._give_up(kind, detail)
            return None
        self.refused_code = code
        self.glog.error("edgesync: the changed source's mold could not import the app (%s); the previous code "
                        "keeps serving until the next change or HUP:\n%s", kind, detail)
        return old

    def _give_up(self, kind: str, detail: str) -> None:
        """The app's import does what a mold must not (start threads, schedule background work): for good."""
        if kind == "threads":
            self.disabled = "the app's import started threads"
            self.glog.warning(
                "edgesync: the app's import started threads: %s. A process with threads cannot fork safely, "
                "so workers are forked by the master as gunicorn does and each one imports the app. To fix: "
                "start them in the worker instead (a function decorated with @edgesync.after_fork, gunicorn's "
                "post_worker_init hook, or lazily on the first request), or set mold = false to silence this.",
                detail)
        else:
            self.disabled = "the app's import calls edgesync.wait_until"
            self.glog.warning(
                "edgesync: the app's import calls edgesync.wait_until (%s), which the mold refuses: it runs no "
                "background work. Workers are forked by the master as gunicorn does and each one imports the "
                "app. To fix: schedule it from a function decorated with @edgesync.after_fork, or set "
                "mold = false to silence this.", detail)
        self.stop()

    def lost(self, mold: Mold) -> None:
        """``mold`` stopped answering (killed?): the next ``get`` starts another for the same config."""
        self.glog.warning("edgesync: mold %d is gone; starting another", mold.pid)
        mold.stop()
        self.dead = (mold.cfg, mold.pid)
        if self.current is mold:
            self.current = None
            if self.refused_cfg is self.arbiter.cfg:
                self.refused_cfg = None

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None
