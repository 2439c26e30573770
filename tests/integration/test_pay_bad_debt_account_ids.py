"""POST /pay-bad-debt names the account in its JSON body: account ids are other teams' text and may
hold any character (README, "Account ids in URLs"), blanks around them included. The id is the one
sent, never trimmed into another account's."""

from __future__ import annotations

from typing import Any

from tests.conftest import Accounts
from tests.integration.bad_debt_setup import into_bad_debt, key, pay, payments


class _Named:
    """Accounts.create with the account id chosen here (into_bad_debt creates its own)."""

    def __init__(self, accounts: Accounts, account_id: str) -> None:
        self.accounts, self.account_id = accounts, account_id

    def create(self) -> tuple[str, str]:
        return self.accounts.create(account_id=self.account_id)


def test_an_account_id_with_blanks_around_it_pays_that_account_not_the_trimmed_one(client, engine, runtime, accounts,
                                                                                  stripe_fake):
    trimmed = into_bad_debt(client, engine, runtime, accounts)
    spaced: Any = into_bad_debt(client, engine, runtime, _Named(accounts, f" {trimmed.account}\n"))  # type: ignore[arg-type]
    stripe_fake.add_invoice(trimmed.invoice_object)
    stripe_fake.add_invoice(spaced.invoice_object)

    response = pay(client, {"account_id": spaced.account, "amount": spaced.amount}, key())

    assert response.status_code == 202, response.json
    assert response.json["account_id"] == spaced.account
    [call] = stripe_fake.intents_created()
    assert call.params["customer"] == spaced.customer and call.params["metadata[account_id]"] == spaced.account
    assert [p["account_id"] for p in payments(engine, spaced.account)] == [spaced.account]
    assert payments(engine, trimmed.account) == []


def test_an_account_id_of_blanks_only_is_looked_up_as_sent(client, stripe_fake, clean):
    response = pay(client, {"account_id": " ", "amount": 1000}, key())
    assert response.status_code == 404 and response.json["error"] == "not_found"
    assert stripe_fake.intents_created() == []
