"""Signing out ends the session on every web host, also when it reaches a host whose clock says the
session is already over.

Found by a security review of the clock skew rule (app/support/session_cookie.py, auth._fresh): a
session's end differs between web hosts by as much as their clocks do (up to MAX_CLOCK_LEAD). A
sign-out that reached a host where the session had just ended by its clock recorded nothing (no
actor: nothing to end), and a copy of the cookie (another tab's, a stolen one) went on working on a
host behind it for up to MAX_CLOCK_LEAD.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from freezegun import freeze_time

from app.domain.snapshot import MAX_CLOCK_LEAD
from app.support.auth import SESSION_MAX_AGE
from tests.conftest import SUPPORT_TOKEN
from tests.integration.test_support import signed_in_with_a_copy

SIGNED_IN = datetime(2026, 12, 1, 8, 0, 0)  # by the clock of the host the sign-in reached
# When the session ends by that host's clock (auth._fresh: the lead taken off its end).
ENDS_HERE = SIGNED_IN + timedelta(seconds=SESSION_MAX_AGE) - MAX_CLOCK_LEAD


def test_a_sign_out_reaching_a_host_where_the_session_just_ended_ends_it_on_the_hosts_behind(flask_app, accounts):
    with freeze_time(SIGNED_IN):
        browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    behind = timedelta(minutes=2)  # a host within the skew rule
    with freeze_time(ENDS_HERE - behind):  # the host behind: the session still holds there
        assert other.get(page).status_code == 200
    with freeze_time(ENDS_HERE + timedelta(seconds=1)):  # the sign-out reaches the host where it just ended
        assert browser.post("/support/logout").status_code == 303
    with freeze_time(ENDS_HERE + timedelta(seconds=1) - behind):  # the host behind, at the same moment
        assert other.get(page).status_code == 401


def test_signing_in_again_where_the_session_just_ended_ends_it_on_the_hosts_behind(flask_app, accounts):
    """Signing in again replaces the browser's session, which ends (auth.sign_in): also when the sign-in
    reaches a host where it is already over by its clock."""
    with freeze_time(SIGNED_IN):
        browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    behind = timedelta(minutes=2)
    with freeze_time(ENDS_HERE + timedelta(seconds=1)):  # asked for the token again there: signs in again
        assert browser.get(page).status_code == 401
        assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
        assert browser.get(page).status_code == 200
    with freeze_time(ENDS_HERE + timedelta(seconds=1) - behind):
        assert other.get(page).status_code == 401
