"""Routes: /write?label= schedules an ORM write; /check reports rows and task-thread connections."""

from __future__ import annotations

import os
import threading
from typing import Any, List

from django.db import connections
from django.db.backends.signals import connection_created
from django.http import HttpResponse, JsonResponse
from django.urls import path

import edgesync

from .models import Row

_lock = threading.Lock()
task_connections: List[Any] = []  # each task thread's DatabaseWrapper for "default"
opened_in_tasks: List[str] = []  # one entry per connection a task thread opened


def _count_task_connections(sender: Any, connection: Any, **kwargs: Any) -> None:
    if threading.current_thread().name.startswith("edgesync-task"):
        with _lock:
            opened_in_tasks.append(threading.current_thread().name)


connection_created.connect(_count_task_connections)


def write_row(label: str) -> None:
    Row.objects.create(label=label, thread=threading.current_thread().name)
    wrapper = connections["default"]  # this thread's own DatabaseWrapper
    with _lock:
        if all(w is not wrapper for w in task_connections):
            task_connections.append(wrapper)


def write(request: Any) -> HttpResponse:
    edgesync.wait_until(write_row, request.GET["label"])
    return HttpResponse("scheduled")


def check(request: Any) -> JsonResponse:
    # Read the completed count first: a task counts as completed only after it has
    # returned (edgesync.django's closing included), so the connections read next
    # are in their final state for those tasks.
    completed = edgesync.runtime_metrics()["tasks"]["completed"]
    with _lock:
        still_open = sum(1 for w in task_connections if w.connection is not None)
        threads, opened = len(task_connections), len(opened_in_tasks)
    return JsonResponse({"rows": Row.objects.count(), "task_threads": threads, "tasks_completed": completed,
                         "open_in_task_threads": still_open, "opened_in_tasks": opened})


def pid(request: Any) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("write", write), path("check", check), path("pid", pid)]
