"""The project's tasks: plain Django Tasks, nothing edgesync-specific.

Which backend runs them is the TASKS setting's business (see settings.py): with
edgesync.django.TasksBackend they run on the worker's background threads after
the response; switch to a database or RQ backend and this file does not change.
"""

try:
    from django.tasks import task
except ImportError:  # Django < 6: the django-tasks backport, same API
    from django_tasks import task

from .models import Visit


@task
def record_visit(path: str, user_agent: str) -> int:
    # Runs after the response; edgesync.django closes its database connection
    # afterwards, as Django does at the end of a request.
    return Visit.objects.create(path=path, user_agent=user_agent[:200]).id
