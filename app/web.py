"""Accessors for what create_app put in the Flask app (request-time only)."""

from __future__ import annotations

from celery import Celery
from flask import current_app

from app.runtime import Runtime


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["dunning"]
    return rt


def celery_app() -> Celery:
    app: Celery = current_app.extensions["celery"]
    return app
