"""What an operator and Account Management see of an account, read the way they read it: the
journeys' end states (tests/integration/test_journeys_*.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.recompute.service import run_recompute
from tests.conftest import SUPPORT_TOKEN, service_headers, wait_for


def dunning(client: Any, account: str) -> dict[str, Any]:
    return dict(client.get(f"/accounts/{account}/dunning", headers=service_headers()).json)


def decided(client: Any, engine: Any, runtime: Any, account: str) -> dict[str, Any]:
    """A recompute now (as `dunning recompute`), then the account's decision as the API answers it."""
    run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))
    response = client.get(f"/accounts/{account}/dunning", headers=service_headers())
    assert response.status_code == 200
    return dict(response.json)


def rules(state: dict[str, Any]) -> list[str]:
    """The rules of a decision's reasons, in order."""
    return [r["rule"] for r in state["reasons"]]


def support_recompute(client: Any, account: str) -> dict[str, Any]:
    """NinjaPanel's button: a full recompute now, waited for."""
    support = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
    response = client.post(f"/support/accounts/{account}/recompute", headers=support)
    assert response.status_code == 202, response.json
    task = response.json["task_id"]
    wait_for(lambda: client.get(f"/support/tasks/{task}", headers=support).json["done"], message="button recompute")
    return dunning(client, account)


def labels(client: Any, account: str) -> dict[str, str]:
    body = client.get(f"/accounts/{account}/billing-history", headers=service_headers()).json
    return {i["id"]: i["label"] for i in body["invoices"]}


def outbox(engine: Any, account: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT event_type FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]
