"""Bad input anywhere gets a 4xx with a reason, never a 500."""

from __future__ import annotations

import pytest

from tests.conftest import SUPPORT_TOKEN, service_headers

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


@pytest.mark.parametrize(("method", "path", "headers", "body"), [
    ("GET", "/accounts/%00/dunning", "service", None),
    ("GET", "/accounts/a%00b/billing-history", "service", None),
    ("GET", "/ops/stuck-events?account_id=%00", "service", None),
    ("POST", "/pay-bad-debt", "service", {"account_id": "\u0000", "amount": 100}),
    ("POST", "/support/accounts/%00/recompute", "support", None),
    ("GET", "/support/accounts/%00/state", "support", None),
])
def test_a_nul_character_is_a_400_with_a_reason(client, method, path, headers, body):
    h = dict(service_headers() if headers == "service" else SUPPORT)
    if path == "/pay-bad-debt":
        h["Idempotency-Key"] = "key-1"
    response = client.open(path, method=method, headers=h, json=body)
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    assert "NUL" in response.json["reason"]
