"""The Redis transport keeps one client per connection pool (tasks/broker.py)."""

from __future__ import annotations

from celery import Celery

from tasks.broker import Channel


def test_channel_reuses_its_client_until_the_pool_changes(celery_app: Celery):
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        first = channel._create_client()
        assert channel._create_client() is first
        channel._disconnect_pools()  # what kombu does on a reconnect
        assert channel._create_client() is not first

