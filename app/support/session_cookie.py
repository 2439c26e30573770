"""The session cookie, read with the fleet's clock skew rule between web hosts.

Flask's cookie carries the time it was signed, and Flask refuses a cookie signed after its host's
clock reads (itsdangerous: "Signature age < 0"): a support person signed in on a web host a second
ahead of another was signed out there, whatever app/support/auth.py allowed, until that host's clock
caught up. Read here, a cookie signed up to MAX_CLOCK_LEAD in the future holds, as any time one of
our hosts stores does (app/domain/snapshot.py). Its age past Flask's permanent_session_lifetime is
refused as before; how long a support session lasts is app/support/auth.py's (SESSION_MAX_AGE, from
the sign-in time the session holds).
"""

from __future__ import annotations

import time

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import BadSignature

from app.domain.snapshot import MAX_CLOCK_LEAD


class SkewTolerantSessionInterface(SecureCookieSessionInterface):
    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        serializer = self.get_signing_serializer(app)
        if serializer is None:
            return None
        value = request.cookies.get(self.get_cookie_name(app))
        if not value:
            return self.session_class()
        try:
            # The signature checked, its age below (itsdangerous refuses any in the future).
            data, signed = serializer.loads(value, return_timestamp=True)
        except BadSignature:
            return self.session_class()
        age = time.time() - signed.timestamp()
        if not -MAX_CLOCK_LEAD.total_seconds() <= age <= app.permanent_session_lifetime.total_seconds():
            return self.session_class()
        return self.session_class(data)
