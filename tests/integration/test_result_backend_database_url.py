"""CELERY_RESULT_BACKEND on PostgreSQL in the usual form (README's example, db+postgresql://...)."""

from __future__ import annotations

import uuid

import pytest

from app.config import Settings
from tasks.factory import make_celery


@pytest.mark.parametrize("scheme", ["db+postgresql", "db+postgres"])
def test_a_database_result_backend_in_the_usual_form_stores_and_reads_results(settings: Settings, scheme: str) -> None:
    """Celery's database backend gives the URL after db+ to SQLAlchemy, which maps a bare postgresql://
    to psycopg 3, not shipped here: every worker failed to start or store a result ("No module named
    'psycopg'"), and the support page's Recompute could never be polled."""
    rest = settings.database_url.split("://", 1)[1]
    configured = Settings.from_env({"DATABASE_URL": settings.database_url, "CELERY_BROKER_URL": settings.broker_url,
                                    "CELERY_RESULT_BACKEND": f"{scheme}://{rest}"})
    backend = make_celery(configured).backend
    task_id = f"cfg-{uuid.uuid4().hex}"
    assert backend.get_state(task_id) == "PENDING"
    backend.store_result(task_id, {"decision": "none"}, "SUCCESS")
    assert backend.get_state(task_id) == "SUCCESS" and backend.get_result(task_id) == {"decision": "none"}
