from django.http import HttpResponse, JsonResponse

from .models import Visit
from .tasks import record_visit


def index(request):
    # Pass plain values, not the request: arguments are stored as JSON, and the
    # request is finished by the time the task runs.
    record_visit.enqueue(request.path, request.headers.get("User-Agent", ""))
    return HttpResponse("Request accepted\n", status=202)


def visits(request):
    latest = Visit.objects.order_by("-id").values("path", "user_agent", "created")[:10]
    return JsonResponse({"count": Visit.objects.count(), "latest": list(latest)})
