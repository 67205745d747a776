"""A mold's heap, made to be shared: out of its workers' collections and, on CPython 3.12+, their reference counts.

design: a worker forked by the mold shares the mold's memory until it writes a page;
the kernel then copies that page for it (copy-on-write), which costs the worker a page
fault and a page of its own. ``gc.freeze()`` keeps the collector from writing to what
the mold holds, but every object a worker merely uses still has its reference count
written (``Py_INCREF``/``Py_DECREF``), and with it the page the object lives on. Since
CPython 3.12 (PEP 683) an *immortal* object's count is never written: the interpreter
makes its own singletons immortal, and PEP 683 names the pre-fork server as the case
for doing the same to a whole heap (Instagram's Cinder has ``gc.immortalize_heap()``).
``freeze`` does that in the mold, before its workers exist: measured with the bench's
Flask app on Python 3.13 / 3.12 (docs/births.md, "What was measured"), a oneshot
worker took 35% / 38% fewer page faults, a birth cost the server 21% / 25% less CPU,
and a worker that served 1,000 requests held 5.1 MB of private memory, not 7.5 MB.

Rule: an immortal object is never freed. In a worker that drops an object the app made
at import, its ``__del__`` and weakref callbacks do not run and its memory stays
(shared with the mold, so costing nothing). Code that reads reference counts
(``sys.getrefcount``, numpy's ``ndarray.resize`` check) sees such objects as held.
The mold's objects live as long as its generation anyway, and a worker's exit
(``_exit.leave``) closes open files itself; ``mold_immortal_heap = false`` turns this
off.

Where: CPython with the GIL, 64-bit, little-endian, 3.12 or later, and only where a
probe confirms it: an object's count is set to PEP 683's immortal value
(``_Py_IMMORTAL_REFCNT``, 0xFFFFFFFF in the low 32 bits, the bits ``Py_INCREF``
tests) and references to it must leave it unchanged. Elsewhere ``freeze`` only
freezes.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import sysconfig
import time
from typing import Any, List, Optional

#: The low 32 bits of an immortal object's reference count (3.12, 3.13: ``_Py_IMMORTAL_REFCNT``);
#: read as an int32 it is negative, which is what ``_Py_IsImmortal`` tests.
_IMMORTAL = 0xFFFFFFFF
#: From here up a count (``sys.getrefcount``) is an immortal one's (3.12, 3.13: an int32 read negative).
_IMMORTAL_MIN = 0x80000000

_why_not: Optional[str] = None
_probed = False


def unsupported() -> Optional[str]:
    """Why this interpreter's objects cannot be made immortal here, or None if they can."""
    global _why_not, _probed
    if not _probed:
        _probed = True
        _why_not = _check()
    return _why_not


def _check() -> Optional[str]:
    if sys.implementation.name != "cpython":
        return "not CPython"
    if sys.version_info < (3, 12):
        return "Python %d.%d has no immortal objects (3.12+)" % sys.version_info[:2]
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "a free-threaded build counts references another way"
    if sys.maxsize < 2**32 or sys.byteorder != "little":
        return "not a 64-bit little-endian build"
    # A new object, made immortal: three more references must leave its count as it is.
    probe = object()
    count = ctypes.c_uint32.from_address(id(probe))
    before = count.value
    count.value = _IMMORTAL
    held = [probe, probe, probe]
    unchanged = count.value == _IMMORTAL
    del held
    if not unchanged:
        count.value = before
        return "this interpreter writes the reference counts of immortal objects"
    return None


def freeze(immortal: bool) -> str:
    """Collect, then freeze the heap (``gc.freeze``); with ``immortal``, where supported, first make every
    object reachable from the collector's immortal. Returns what was done, for the log."""
    gc.collect()
    done = ""
    if immortal and unsupported() is None:
        started = time.monotonic()
        made = _immortalize(gc.get_objects())
        done = "%d objects made immortal in %.2fs" % (made, time.monotonic() - started)
    gc.freeze()
    return done


def _immortalize(roots: List[Any]) -> int:
    """Make ``roots`` and everything they reach immortal; the number of objects that were not already.

    Objects the collector does not track (strings, numbers, most tuples of them) are reached
    as what a tracked one refers to. An immortal object is not walked again (its mark is
    its count), so what only an object immortal already refers to (the interpreter's own,
    or made so by an earlier freeze) stays as it is: mortal, which is only less shared.
    """
    made = 0
    todo = roots
    at = ctypes.c_uint32.from_address
    held = sys.getrefcount  # an immortal object's count reads at least _IMMORTAL_MIN
    referents = gc.get_referents
    while todo:
        obj = todo.pop()
        if held(obj) >= _IMMORTAL_MIN:
            continue
        at(id(obj)).value = _IMMORTAL
        made += 1
        todo += [r for r in referents(obj) if held(r) < _IMMORTAL_MIN]
    return made
