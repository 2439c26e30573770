from tasks.factory import make_celery

app = make_celery()
