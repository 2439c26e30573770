"""What failed decides the failure class (tasks/failures.py classify), whoever raises it.

app.dispatch wraps every failure to publish (redis-py's, kombu's, a URL it cannot read) in
BrokerUnavailable, so that is what the broker's outage looks like to every caller of send: it is
the broker's class, retried with that class's backoff and, past its retries, left 'retrying' for
beat to re-drive; not 'unexpected' (a bug: three retries, then dead, for an operator).
"""

from __future__ import annotations

from kombu.exceptions import OperationalError as KombuOperationalError

from app.dispatch import BrokerUnavailable
from tasks.failures import INFRASTRUCTURE, PASSING, FailureKind, classify


def _refused_send() -> BrokerUnavailable:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            raise BrokerUnavailable("broker did not accept tasks.sweep_batch: ConnectionError") from exc
    except BrokerUnavailable as wrapped:
        return wrapped


def test_a_send_the_broker_refused_is_the_brokers_failure_class():
    assert classify(_refused_send()) is FailureKind.BROKER_UNAVAILABLE
    assert classify(BrokerUnavailable("broker did not accept tasks.recompute_account: TimeoutError")) is \
        FailureKind.BROKER_UNAVAILABLE


def test_the_brokers_own_errors_are_its_class_too_and_a_bug_is_not():
    assert classify(KombuOperationalError("Error 111 connecting to 127.0.0.1:6379")) is FailureKind.BROKER_UNAVAILABLE
    assert classify(ConnectionResetError()) is FailureKind.BROKER_UNAVAILABLE
    assert classify(RuntimeError("a bug")) is FailureKind.UNEXPECTED


def test_the_brokers_class_passes_and_is_infrastructure():
    assert FailureKind.BROKER_UNAVAILABLE in PASSING and FailureKind.BROKER_UNAVAILABLE in INFRASTRUCTURE
