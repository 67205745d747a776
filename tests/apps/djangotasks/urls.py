"""Routes: /enqueue?dir= enqueues a task that waits for dir/go; /result?id= reports its result."""

from __future__ import annotations

import os
from typing import Any

from django.http import HttpResponse, JsonResponse
from django.urls import path

from .tasks import write_when_released


def enqueue(request: Any) -> JsonResponse:
    result = write_when_released.enqueue(request.GET["dir"], "written by %d" % os.getpid())
    return JsonResponse({"id": result.id, "status": result.status})


def result(request: Any) -> JsonResponse:
    found = write_when_released.get_result(request.GET["id"])
    return JsonResponse({"status": found.status, "worker_ids": found.worker_ids,
                         "return_value": found.return_value if found.status == "SUCCESSFUL" else None})


def pid(request: Any) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("enqueue", enqueue), path("result", result), path("pid", pid)]
