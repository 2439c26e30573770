"""Celery tasks. ``celery -A tasks`` finds the app in tasks/celery.py; task names are stable
(``tasks.recompute_account`` ...) because other systems and Flower depend on them."""
