"""Routes: /enqueue?dir= enqueues a task that waits for dir/go; /spin enqueues one that burns
CPU; /result?id= reports a result of this worker."""

from __future__ import annotations

import os
from typing import Any

from django.http import HttpResponse, JsonResponse
from django.urls import path

from .tasks import spin, write_when_released

try:
    from django.tasks import default_task_backend
except ImportError:  # Django < 6: the backport
    from django_tasks import default_task_backend


def enqueue(request: Any) -> JsonResponse:
    result = write_when_released.enqueue(request.GET["dir"], "written by %d" % os.getpid())
    return JsonResponse({"id": result.id, "status": result.status})


def enqueue_spin(request: Any) -> JsonResponse:
    result = spin.enqueue(float(request.GET.get("s", "30")))
    return JsonResponse({"id": result.id, "status": result.status})


def result(request: Any) -> JsonResponse:
    found = default_task_backend.get_result(request.GET["id"])
    return JsonResponse({"status": found.status, "worker_ids": found.worker_ids,
                         "errors": [e.exception_class_path for e in found.errors],
                         "return_value": found.return_value if found.status == "SUCCESSFUL" else None,
                         "pid": os.getpid()})


def pid(request: Any) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("enqueue", enqueue), path("spin", enqueue_spin), path("result", result),
               path("pid", pid)]
