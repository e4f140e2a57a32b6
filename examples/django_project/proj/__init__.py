"""The Django project. Importing it loads the Celery app, so that ``@shared_task`` tasks
use it (the layout of Celery's "First steps with Django")."""

from .celery import app as celery_app

__all__ = ("celery_app",)
