from django.db import models


class Row(models.Model):
    label = models.CharField(max_length=50)
    thread = models.CharField(max_length=50)
