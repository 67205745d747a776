from django.db import models


class Visit(models.Model):
    path = models.CharField(max_length=200)
    user_agent = models.CharField(max_length=200, blank=True)
    created = models.DateTimeField(auto_now_add=True)
