"""The session cookie is signed, not encrypted: whoever holds a copy (a leaked cookie, a proxy log)
reads what it holds. It holds the actor and a value that must still match a configured token on every
request (removing a token ends its sessions), never the token. A plain hash of the token there let a
leaked cookie test guesses of a weak token offline, at the speed of SHA-256; keyed with SECRET_KEY
(HMAC) it tells nothing without the key."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import SUPPORT_TOKEN, Accounts


def serializer_of(app: Flask) -> Any:
    """The app's own cookie serializer (Flask's SecureCookieSessionInterface)."""
    return app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]


def held(app: Flask, client: FlaskClient) -> dict[str, Any]:
    """What the browser's session cookie holds, as anyone holding a copy can read it."""
    cookie = client.get_cookie("session")
    assert cookie is not None
    data: dict[str, Any] = serializer_of(app).loads(cookie.value)
    return data


def unkeyed_hashes(token: str) -> set[str]:
    raw = token.encode()
    return {hashlib.new(name, raw).hexdigest() for name in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512",
                                                              "sha3_256", "sha3_512", "blake2b", "blake2s")}


def signed_in(app: Flask, accounts: Accounts) -> tuple[FlaskClient, str]:
    client = app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    assert client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    assert client.get(page).status_code == 200
    return client, page


def test_the_cookie_holds_nothing_a_guess_of_the_token_can_be_checked_against(flask_app, settings, runtime,
                                                                               celery_app, accounts) -> None:
    from app import create_app

    client, _ = signed_in(flask_app, accounts)
    session = held(flask_app, client)["support"]
    assert SUPPORT_TOKEN not in str(session)
    values = {str(v) for v in session.values()}
    assert not values & unkeyed_hashes(SUPPORT_TOKEN), session
    # What stands for the token depends on SECRET_KEY: without the key, nothing to check a guess against.
    other_app = create_app(settings.with_overrides(secret_key="another-" + settings.secret_key), runtime=runtime,
                           celery=celery_app)
    other_client, _ = signed_in(other_app, accounts)
    other = held(other_app, other_client)["support"]
    assert other.keys() == session.keys()
    changed = {k for k in session if session[k] != other[k]} - {"csrf", "sid", "at"}
    assert changed, (session, other)


def test_a_session_holding_a_plain_hash_of_the_token_needs_a_new_sign_in(flask_app, accounts) -> None:
    """Sessions signed in before the keyed value: their cookie is refused, the form asks for the token."""
    client, page = signed_in(flask_app, accounts)
    session = held(flask_app, client)["support"]
    old = {"digest": hashlib.sha256(SUPPORT_TOKEN.encode()).hexdigest(), "actor": session["actor"],
           "csrf": session["csrf"], "at": int(time.time()), "sid": session["sid"] + "-old"}
    client.set_cookie("session", serializer_of(flask_app).dumps({"support": old}))
    refused = client.get(page)
    assert refused.status_code == 401 and 'name="token"' in refused.get_data(as_text=True)
    assert client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    assert client.get(page).status_code == 200
