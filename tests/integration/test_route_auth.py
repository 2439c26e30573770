"""Every route of the app, from its url_map: which realm's token opens it (DESIGN section 11). A route
added without its decorator fails here, as does one a token of the other realm opens."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from tests.conftest import SERVICE_TOKEN, SUPPORT_TOKEN

# Open on purpose: probes, Prometheus (counts only), Stripe (its signature is the check), the
# sign-in form and its way out, the page's script.
OPEN = {"/healthz", "/readyz", "/metrics", "/webhooks/stripe", "/support/login", "/support/logout",
        "/static/<path:filename>"}
SAMPLE = {"account_id": "acct_none", "stuck_id": "1", "task_id": "00000000-0000-0000-0000-000000000000"}
WRONG = {"none": None, "empty bearer": "Bearer ", "lowercase scheme, empty": "bearer   ",
         "basic": f"Basic {SERVICE_TOKEN}", "a prefix of a token": f"Bearer {SERVICE_TOKEN[:-1]}",
         "a token and more": f"Bearer {SUPPORT_TOKEN}x",
         "non-ASCII": "Bearer \xe9t\xe9"}


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """(method, path with sample values, realm) for every route that is not open."""
    routes: list[tuple[str, str, str]] = []
    for rule in app.url_map.iter_rules():
        if rule.rule in OPEN:
            continue
        realm = "support" if rule.rule.startswith("/support/") else "service"
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: SAMPLE[m.group(1)], rule.rule)  # any converter
        routes.extend((method, path, realm) for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
    return routes


def test_every_route_is_open_on_purpose_or_needs_a_token(flask_app, client, clean):
    routes = _routes(flask_app)
    assert len(routes) >= 13  # the url_map was read: accounts, pay-bad-debt, ops, support
    for method, path, realm in routes:
        right = SERVICE_TOKEN if realm == "service" else SUPPORT_TOKEN
        other = SUPPORT_TOKEN if realm == "service" else SERVICE_TOKEN
        for name, header in {**WRONG, "the other realm's token": f"Bearer {other}"}.items():
            headers = {} if header is None else {"Authorization": header}
            response = client.open(path, method=method, headers=headers, json={} if method == "POST" else None)
            assert response.status_code == 401, (method, path, name, response.status_code)
        opened = client.open(path, method=method, headers={"Authorization": f"Bearer {right}"},
                             json={} if method == "POST" else None)
        assert opened.status_code not in (401, 403, 500), (method, path, opened.status_code)


@pytest.mark.parametrize("path", sorted(OPEN - {"/static/<path:filename>", "/webhooks/stripe", "/support/logout"}))
def test_the_open_routes_answer_without_a_token(client, clean, path):
    assert client.get(path).status_code in (200, 503)  # readyz: 503 when a dependency is down


def _as_a_server_passes_it(header: str) -> str:
    """A header value as WSGI hands it to the app (PEP 3333; gunicorn does so): each byte the client
    sent as the latin-1 character of that byte, so UTF-8 text arrives as its bytes' latin-1 spelling."""
    return header.encode("utf-8").decode("latin-1")


@pytest.mark.parametrize(("path", "realm"), [("/ops/outbox", "service"), ("/support/lifting", "support")])
def test_a_token_holding_non_ascii_text_opens_its_realm_as_configured(client, clean, runtime, monkeypatch, path,
                                                                     realm):
    """SETTINGS accept a token of any printable text (a space or a line break stops start-up); curl and
    every HTTP library send a header's text as UTF-8. Read as the server's latin-1 spelling, no such
    token ever matched: every request a 401, as the token configured."""
    token = f"t\u00f6k\u00e9n-{realm}-\u20ac"
    field = "service_tokens" if realm == "service" else "support_tokens"
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(**{field: {token: "ann"}}))
    opened = client.get(path, headers={"Authorization": _as_a_server_passes_it(f"Bearer {token}")})
    assert opened.status_code == 200, opened.get_data(as_text=True)
    near = client.get(path, headers={"Authorization": _as_a_server_passes_it(f"Bearer {token[:-1]}")})
    assert near.status_code == 401
