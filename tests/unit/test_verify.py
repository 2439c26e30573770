"""Decoding a verified body: orjson where it can, json.loads where it refuses, the same result."""

from __future__ import annotations

import json

import pytest

from tests.stripe_events import event
from webhooks.verify import BadWebhook, _decode


@pytest.mark.parametrize("text", [
    json.dumps(event("invoice.payment_failed", id="in_1", customer="cus_1", created=1)),
    '{"id": "evt_1", "amount": 18446744073709551615}',  # 2**64 - 1, the largest orjson reads as int
    '{"id": "evt_1", "name": "\\ud800"}',  # a lone surrogate escape
    '{"id": "evt_1", "ratio": NaN}',
    '{"id": "evt_1", "id": "evt_2"}',  # a repeated key: the last wins
])
def test_a_body_decodes_as_json_loads_decodes_it(text: str):
    # Compared through json.dumps: NaN is not equal to itself, its text is.
    assert json.dumps(_decode(text)) == json.dumps(json.loads(text))


@pytest.mark.parametrize("text", ["", "{", "{'id': 1}", "[1,]"])
def test_what_neither_decodes_is_not_json(text: str):
    with pytest.raises(BadWebhook, match="not JSON"):
        _decode(text)
