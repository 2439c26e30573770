"""A support session signed in on one web host holds on the others within the fleet's clock skew rule
(MAX_CLOCK_LEAD, app/domain/snapshot.py), and no host's lead makes it last longer than
SESSION_MAX_AGE.

Found by a clock audit: a session was refused when its sign-in time was more than 60 s ahead of the
host's clock, where every other rule between our hosts allows 5 minutes: signed in on a host 90 s
ahead, the support person was asked for the token again on every other host. The 5 minutes are taken
off the session's end as well: a sign-in dated by a host ahead would otherwise last that much longer on
the hosts behind it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from flask.testing import FlaskClient
from freezegun import freeze_time

from app.domain.snapshot import MAX_CLOCK_LEAD
from app.support.auth import SESSION_MAX_AGE
from tests.conftest import SUPPORT_TOKEN

SIGNED_IN = datetime(2026, 12, 1, 8, 0, 0)  # by the clock of the host the sign-in reached


def _signed_in(flask_app, accounts) -> tuple[FlaskClient, str]:
    client = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    with freeze_time(SIGNED_IN):
        assert client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    return client, page


def test_a_session_signed_in_on_a_host_90_s_ahead_holds_on_the_others(flask_app, accounts):
    client, page = _signed_in(flask_app, accounts)
    with freeze_time(SIGNED_IN - timedelta(seconds=90)):  # another host, 90 s behind the first
        assert client.get(page).status_code == 200


def test_a_sign_in_dated_further_ahead_than_the_skew_rule_is_refused(flask_app, accounts):
    client, page = _signed_in(flask_app, accounts)
    with freeze_time(SIGNED_IN - MAX_CLOCK_LEAD - timedelta(seconds=1)):
        assert client.get(page).status_code == 401


def test_a_host_ahead_does_not_make_a_session_last_longer(flask_app, accounts):
    """Signed in on a host 4 minutes ahead: on a host whose clock is right the session ends no later
    than SESSION_MAX_AGE after the sign-in really happened."""
    client, page = _signed_in(flask_app, accounts)
    really_signed_in = SIGNED_IN - timedelta(minutes=4)
    ends = really_signed_in + timedelta(seconds=SESSION_MAX_AGE)
    with freeze_time(ends - timedelta(minutes=10)) as clock:
        assert client.get(page).status_code == 200
        clock.move_to(ends)  # 11 h 56 min by the signing host's clock, 12 h in fact
        assert client.get(page).status_code == 401
