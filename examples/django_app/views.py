from django.http import HttpResponse, JsonResponse

import edgesync

from .models import Visit


def record_visit(path: str, user_agent: str) -> None:
    # Runs on a background thread after the response; edgesync.django closes its
    # database connection afterwards, as Django does at the end of a request.
    Visit.objects.create(path=path, user_agent=user_agent[:200])


def index(request):
    # Pass plain values, not the request: it is finished by the time the task runs.
    edgesync.wait_until(record_visit, request.path, request.headers.get("User-Agent", ""))
    return HttpResponse("Request accepted\n", status=202)


def visits(request):
    latest = Visit.objects.order_by("-id").values("path", "user_agent", "created")[:10]
    return JsonResponse({"count": Visit.objects.count(), "latest": list(latest)})
