"""``@edgesync.durable``: tasks that are recorded until they complete, and run again if their worker dies.

A durable task is a module-level function (importable by its path, so another process
can run it) called with JSON arguments (so they can be written down). Both are checked
when ``wait_until`` is called, never when the task runs: a lambda, a nested function, a
method, a function of ``__main__`` or an argument that does not come back from JSON
unchanged is a ``TypeError`` at the call site, saying why and what to do.

Rule: a durable task runs at least once. It may run more than once (its worker died
after it ran but before it was marked done): write it to be idempotent, and read
``edgesync.current_attempt()`` to know whether this is a re-run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import json
from typing import Any, Callable, Dict, Generic, Iterator, Optional, ParamSpec, Tuple, TypeVar, overload

P = ParamSpec("P")
T = TypeVar("T")

_attempt: contextvars.ContextVar[int] = contextvars.ContextVar("edgesync_attempt", default=0)

#: ``edgesync.otel`` while it is on: its ``carrier()`` is kept with each task's arguments and
#: its ``run(carrier, attempt)`` is entered around each run (see ``attempt_scope``).
tracing: Any = None


def current_attempt() -> int:
    """The attempt number of the durable task running in this context: 1 on its first run.

    2 and more mean a re-run: an earlier run was accepted but its worker died (SIGKILL,
    OOM kill, a hard limit, a drain past ``graceful_timeout``) before it completed. 0
    outside a durable task.
    """
    return _attempt.get()


@contextlib.contextmanager
def attempt_scope(attempt: int, payload: Optional[str] = None, name: str = "") -> Iterator[None]:
    """Around each run: the attempt number, and (``payload``: the task's record) its trace."""
    token = _attempt.set(attempt)
    try:
        carrier = json.loads(payload)[2:] if tracing is not None and payload else None
        if carrier:
            with tracing.run(carrier[0], attempt, name):
                yield
        else:
            yield
    finally:
        _attempt.reset(token)


class DurableFunction(Generic[P, T]):
    """A function declared with ``@edgesync.durable``; call it as the function itself.

    ``edgesync.wait_until(fn, *args, **kwargs)`` of a durable function records the task
    before it returns and deletes the record when the task ends; ``fn(*args)`` is a plain
    call. ``path`` is its import path (``module:qualname``).
    """

    def __init__(self, fn: Callable[P, T], max_attempts: Optional[int]):
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn)
        self.path = "%s:%s" % (fn.__module__, fn.__qualname__)
        self.max_attempts = max_attempts
        self._importable = False

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        return "<durable function %s>" % self.path

    def encode(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        """The arguments as the JSON text the journal keeps; TypeError if they cannot be kept."""
        if not self._importable:
            self._check_importable()
        # A third element: the caller's trace context (edgesync.otel), when there is one.
        extra = [tracing.carrier()] if tracing is not None else []
        try:
            text = json.dumps([args, kwargs] + [e for e in extra if e], separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                "wait_until(%s, ...): a durable task's arguments must be JSON values (str, int, float, bool, "
                "None, lists and dicts with str keys), because they are written to the journal and may be "
                "read back by another process; %s. Pass an id and load the object in the task."
                % (self.path, exc)) from None
        # Tuples become lists and int keys become strings: the task would get other values on a re-run.
        if json.loads(text)[:2] != [list(args), kwargs]:
            raise TypeError(
                "wait_until(%s, ...): a durable task's arguments must come back from JSON unchanged, so that "
                "a re-run gets what the first run got; got %s. Use lists instead of tuples and str dict keys."
                % (self.path, _short((args, kwargs))))
        return text

    def _check_importable(self) -> None:
        try:
            found = resolve(self.path)
        except (ImportError, AttributeError) as exc:
            raise TypeError(
                "wait_until(%s, ...): a durable task must be importable by its path, so that another "
                "process can run it; %s. Define it at module level under its own name." % (self.path, exc)
            ) from None
        if found is not self:
            raise TypeError(
                "wait_until(%s, ...): %s names %r, not this durable function: another process would run "
                "something else. Decorate the module-level function itself, once." % (self.path, self.path, found))
        self._importable = True


def resolve(path: str) -> Any:
    """The object at ``module:qualname``."""
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@overload
def durable(fn: Callable[P, T], /) -> DurableFunction[P, T]: ...
@overload
def durable(*, max_attempts: Optional[int] = None) -> Callable[[Callable[P, T]], DurableFunction[P, T]]: ...


def durable(fn: Optional[Callable[P, T]] = None, /, *,
            max_attempts: Optional[int] = None) -> Any:
    """Declare a module-level function a durable task: ``@edgesync.durable`` or ``@durable(max_attempts=5)``.

    ``edgesync.wait_until(fn, *args)`` then records the task (in ``durable_journal``)
    before it returns, deletes the record when the task ends (returning or raising), and
    a live worker of the same server runs it again if its worker died first, up to
    ``max_attempts`` runs in all (default: the ``durable_max_attempts`` setting); see
    ``edgesync.current_attempt()``. Raises ``TypeError`` here for anything but a plain
    module-level function, and in ``wait_until`` for arguments that are not JSON values.
    """
    if max_attempts is not None and (isinstance(max_attempts, bool) or not isinstance(max_attempts, int)
                                     or not 1 <= max_attempts <= 1000):
        raise TypeError("durable(max_attempts=%r): max_attempts must be an integer from 1 to 1000"
                        % (max_attempts,))

    def declare(f: Callable[P, T]) -> DurableFunction[P, T]:
        _check_function(f)
        return DurableFunction(f, max_attempts)

    return declare if fn is None else declare(fn)


def _check_function(f: Any) -> None:
    what = None
    if isinstance(f, DurableFunction):
        what = "it is durable already"
    elif inspect.ismethod(f):
        what = "it is a bound method (its object cannot be written down)"
    elif not inspect.isfunction(f):
        what = "it is a %s, not a function defined with def" % type(f).__name__
    elif f.__name__ == "<lambda>":
        what = "it is a lambda (it has no import path)"
    elif "<locals>" in f.__qualname__:
        what = "it is defined inside another function (it has no import path)"
    elif "." in f.__qualname__:
        what = "it is defined in a class (another process would need its object)"
    elif f.__module__ == "__main__":
        what = "it is defined in __main__ (another process imports a different __main__)"
    if what is not None:
        raise TypeError("@edgesync.durable cannot take %r: %s. A durable task must be a function defined at "
                        "the top level of an importable module." % (f, what))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
