"""Generated junk at every edge of the web app: no request a caller can send is answered 5xx, and a
signed Stripe event whose fields have the wrong types is either stored (and then recomputes) or
refused whole with a 4xx: never half-stored, never accepted and then lost.

Hypothesis draws the requests; each test runs in a few seconds. The hand-picked cases of the same
edges (a NUL, a lone surrogate, a body nested too deeply, an amount beyond bigint) are in
test_bad_input.py and test_edges_http.py."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from app.recompute.service import run_recompute
from app.runtime import Runtime
from tests.conftest import SERVICE_TOKEN, SUPPORT_TOKEN, WEBHOOK_SECRET
from tests.stripe_events import FIXTURES, body_and_headers, event, set_path

CUSTOMER = "cus_QXg1o8vcGmoR32"  # the customer the derived events' objects name
HOSTILE_NUMBERS = [float("inf"), float("-inf"), float("nan"), 2**63, -2**63 - 1, 2**31, 1e300, 0.5, -1, 0]
HOSTILE_TEXT = ["\x00", "a\x00b", "\ud800", "x\udc80", "", " ", "9" * 3000, "é", "in_1", CUSTOMER,
                "99999999999999999999", "-1", "1.5", "null", "[]", "{}"]
# Scalars of every JSON type, with the values a column or a parser refuses: beyond bigint, beyond
# a double (orjson reads 2**70 as a float), NaN and Infinity (Python's JSON reads them), NUL, surrogates.
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_TEXT + HOSTILE_NUMBERS),
)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# A field's value: half the time one of the values known to be refused somewhere, else any junk.
A_VALUE = st.sampled_from(HOSTILE_TEXT + HOSTILE_NUMBERS) | JUNK

EVENT_TYPES = sorted(p.stem for p in (FIXTURES / "derived-events").glob("*.json") if p.stem != "MANIFEST")


def _leaves(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every place in ``value`` a field could hold something else: each key, and each list's
    first two items (an object or a list itself included)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _leaves(inner, (*prefix, key))
    elif isinstance(value, list):
        for n, inner in enumerate(value[:2]):
            out += _leaves(inner, (*prefix, str(n)))
    return out


class _Reads(dict[str, Any]):
    """An event's object that records the path of every key read from it (absent ones too)."""

    def __init__(self, value: dict[str, Any], path: tuple[str, ...], seen: set[tuple[str, ...]]) -> None:
        super().__init__({k: _watched(v, (*path, k), seen) for k, v in value.items()})
        self.path, self.seen = path, seen

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add((*self.path, key))
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add((*self.path, key))
        return super().__getitem__(key)


def _watched(value: Any, path: tuple[str, ...], seen: set[tuple[str, ...]]) -> Any:
    if isinstance(value, dict):
        return _Reads(value, path, seen)
    if isinstance(value, list):
        return [_watched(v, (*path, str(n)), seen) for n, v in enumerate(value)]
    return value


def _read(event_type: str) -> list[tuple[str, ...]]:
    """The fields ingest reads of an event of ``event_type`` (the mirror's extract, the bad-debt
    outcome's): where a value of another type matters, found by reading, not listed by hand."""
    from app.payments import bad_debt_webhook
    from webhooks.mirror import extract

    seen: set[tuple[str, ...]] = set()
    watched = _watched(event(event_type), (), seen)
    extract(watched)
    intent = bad_debt_webhook._intent(watched)
    bad_debt_webhook.failure_reason(intent), bad_debt_webhook._meta_id(intent), bad_debt_webhook._customer(intent)
    bad_debt_webhook._metadata(intent, "account_id")
    return sorted(seen)


PATHS = {t: _leaves(event(t)) for t in EVENT_TYPES}
READ = {t: _read(t) for t in EVENT_TYPES}
# Half of the draws a field ingest reads, half any field (one the product ignores must stay ignored).
A_FIELD = st.sampled_from(EVENT_TYPES).flatmap(
    lambda t: st.tuples(st.just(t), st.sampled_from(READ[t]) | st.sampled_from(PATHS[t])))


def _account(engine: Engine) -> str:
    """The account the derived events' customer belongs to (once per test: the examples share it)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('acct_fuzz') ON CONFLICT DO NOTHING")
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, 'acct_fuzz') "
                             "ON CONFLICT DO NOTHING", {"c": CUSTOMER})
    return "acct_fuzz"


def _stored(engine: Engine, event_id: Any) -> bool:
    if not isinstance(event_id, str) or "\x00" in event_id:
        return False
    try:
        event_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1 FROM stripe_event WHERE id = %(i)s", {"i": event_id}).first() is not None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=A_FIELD, value=A_VALUE)
def test_a_signed_event_with_any_field_of_another_type_is_stored_or_refused_whole(
        client: FlaskClient, engine: Engine, runtime: Runtime, clean: None, field: Any, value: Any):
    """A 200 means stored (the event is in the inbox) and the account's recompute over what was
    mirrored works; a 4xx means nothing of it was stored (Stripe redelivers it); never a 5xx."""
    account = _account(engine)
    event_type, path = field
    evt = event(event_type)
    if isinstance(evt["data"]["object"], dict) and "customer" in evt["data"]["object"]:
        evt["data"]["object"]["customer"] = CUSTOMER  # routed: its mirror row is written
    set_path(evt, ".".join(path), value)
    body, headers = body_and_headers(evt, WEBHOOK_SECRET)
    response = client.post("/webhooks/stripe", data=body, headers=headers)
    assert response.status_code in (200, 400, 413, 422), (response.status_code, response.get_data(as_text=True))
    event_id = evt.get("id")
    if response.status_code == 200:
        assert _stored(engine, event_id), "answered 200 but not stored"
        run_recompute(engine, runtime.policy, account, "STATE_REFRESH")  # what was accepted is usable
    elif path != ("id",):  # its own id unchanged: a fresh one, stored by no earlier example
        assert not _stored(engine, event_id), "refused but stored"


def _routes(app: Flask) -> list[tuple[str, tuple[str, ...]]]:
    """Each route with the methods it takes (HEAD and OPTIONS left to the junk methods)."""
    return sorted((rule.rule, tuple(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})))
                  for rule in app.url_map.iter_rules())


PATH_VALUES = st.one_of(
    st.sampled_from(["acct_fuzz", "%00", "%ff", "%ed%a0%80", "a" * 5000, "99999999999999999999", "-1", "0",
                     "12345678-1234-5678-1234-567812345678", "%2F", "..", "%25"]),
    st.text(max_size=20).map(lambda t: quote(t, safe="")),
)
# Mostly a valid token of either realm, so that the junk reaches the views behind them.
AUTHORIZATION = st.sampled_from([f"Bearer {SERVICE_TOKEN}"] * 4 + [f"Bearer {SUPPORT_TOKEN}"] * 4 + [
    None, "Bearer", "Bearer ", "Bearer \xe9\xff", f"bearer {SERVICE_TOKEN}\xe9", "Basic YTpi", "Bearer " + "x" * 5000])
# Percent-encoded as UTF-8 (a lone surrogate as the bytes no UTF-8 text holds), names repeated too.
QUERY = st.lists(st.tuples(st.sampled_from(["limit", "state", "account_id", "next", "x"]),
                           st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE_TEXT))), max_size=3).map(
    lambda pairs: "&".join(f"{name}={quote(value.encode('utf-8', 'surrogatepass'), safe='')}" for name, value in pairs))
BODY = st.one_of(
    st.none(),
    JUNK.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"[" * 5000, b"\xff\xfe{}", b'{"account_id": "acct_fuzz", "amount": 1e400}',
                     b'{"action": "hold", "reason": "\\u0000"}', b'{"account_id": "\\ud800", "amount": 1}',
                     b"token=%ff&next=%00"]),
)
CONTENT_TYPE = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                "multipart/form-data; boundary=b", "application/json; charset=utf-16"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_junk_at_any_route_with_any_method_is_never_a_5xx(flask_app: Flask, client: FlaskClient, engine: Engine,
                                                          clean: None, data: Any):
    _account(engine)  # "acct_fuzz" among the path values is a real account
    rule, methods = data.draw(st.sampled_from(_routes(flask_app)))
    path = rule
    while "<" in path:
        start, end = path.index("<"), path.index(">")
        path = path[:start] + data.draw(PATH_VALUES) + path[end + 1:]
    method = data.draw(st.sampled_from(methods) | st.sampled_from(methods)
                       | st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    headers = {name: value for name, value in (
        ("Authorization", data.draw(AUTHORIZATION)),
        ("Idempotency-Key", data.draw(st.sampled_from([None, "key-1", "\xe9" * 3, "x" * 300]))),
        ("Stripe-Signature", data.draw(st.sampled_from([None, "t=1,v1=00", "t=x", "\xe9"]))),
        ("X-Support-CSRF", data.draw(st.sampled_from([None, "x", "\xe9"]))),
    ) if value is not None}
    content_type = data.draw(CONTENT_TYPE)
    response = client.open(path, method=method, headers=headers, query_string=data.draw(QUERY),
                           data=data.draw(BODY), content_type=content_type)
    assert response.status_code < 500, (method, path[:200], response.status_code, response.get_data(as_text=True))
