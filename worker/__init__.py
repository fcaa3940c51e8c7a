"""dermq's Celery worker: the app and its configuration, the tasks, and the per-process model runtime."""
