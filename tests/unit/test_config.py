"""Settings.from_env: a malformed or unsafe setting is a ConfigError naming it (never the secret)."""

from __future__ import annotations

import pytest

from app.config import (
    MAX_TASK_COUNTDOWN,
    MAX_VISIBILITY_TIMEOUT,
    MIN_TASK_TIME_LIMIT,
    MIN_VISIBILITY_TIMEOUT,
    ConfigError,
    Settings,
    parse_service_tokens,
    parse_support_tokens,
)

DB = "postgresql://nobody@127.0.0.1/x"


def settings(**env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": DB, **env})


def test_one_token_for_two_support_actors_is_refused_naming_the_entries_not_the_token():
    """alice:tok1,bob:tok1 gave {'tok1': 'bob'}: Alice's actions audited as Bob's."""
    with pytest.raises(ConfigError) as err:
        settings(SUPPORT_TOKENS="alice:tok-shared-1,bob:tok-shared-1")
    message = str(err.value)
    assert "SUPPORT_TOKENS" in message and "entries 1 and 2" in message
    assert "tok-shared-1" not in message and "alice" not in message and "bob" not in message
    # the same entry twice is still one actor's token
    assert parse_support_tokens("alice:t1, alice:t1,bob:t2") == {"t1": "alice", "t2": "bob"}


def test_a_token_in_both_service_and_support_tokens_is_refused():
    with pytest.raises(ConfigError) as err:
        settings(SERVICE_TOKENS="svc-a,tok-both-2", SUPPORT_TOKENS="alice:tok-alice,carol:tok-both-2")
    message = str(err.value)
    assert "SUPPORT_TOKENS entry 2" in message and "SERVICE_TOKENS entry 2" in message
    assert "carol" not in message and "alice" not in message and "tok-both-2" not in message
    ok = settings(SERVICE_TOKENS="svc-a", SUPPORT_TOKENS="alice:tok-alice")
    assert ok.service_tokens == {"svc-a": "service"} and ok.support_tokens == {"tok-alice": "alice"}


def test_service_tokens_may_name_their_service():
    assert parse_service_tokens("billing-ops:tok-1, tok-2 ,reports : tok-3") == {
        "tok-1": "billing-ops", "tok-2": "service", "tok-3": "reports"}
    with pytest.raises(ConfigError) as err:
        settings(SERVICE_TOKENS="billing-ops:tok-shared,reports:tok-shared")
    assert "entries 1 and 2" in str(err.value) and "tok-shared" not in str(err.value)
    with pytest.raises(ConfigError, match="SERVICE_TOKENS entries must look like actor:token or token"):
        settings(SERVICE_TOKENS=":tok-1")


@pytest.mark.parametrize(
    ("env", "entries"),
    [
        # bare tokens holding a ':' are read as name:token, so what reads as a name is part of a secret
        ({"SERVICE_TOKENS": "svc-a,k9Xq:shared-tail,Zr7w:shared-tail"}, "entries 2 and 3"),
        ({"SERVICE_TOKENS": "k9Xq:tail one"}, "entry 1"),
        ({"SUPPORT_TOKENS": "alice:a1,k9Xq:shared-tail,Zr7w:shared-tail"}, "entries 2 and 3"),
        ({"SUPPORT_TOKENS": "k9Xq:tail one"}, "entry 1"),
        ({"SERVICE_TOKENS": "svc-a,k9Xq:shared-tail", "SUPPORT_TOKENS": "alice:a1,Zr7w:shared-tail"},
         "SUPPORT_TOKENS entry 2"),
    ],
)
def test_no_token_error_shows_what_reads_as_a_name_which_may_be_part_of_a_token(env, entries):
    """A bare SERVICE_TOKENS token holding a ':' is read as name:token: an error quoting the name
    showed the first part of the secret. Entries are named by their position instead."""
    with pytest.raises(ConfigError) as err:
        settings(**env)
    message = str(err.value)
    assert entries in message
    for part in ("k9Xq", "Zr7w", "shared-tail", "tail one", "alice", "svc-a"):
        assert part not in message


@pytest.mark.parametrize("value", ["0", "1", "20", "60", "90", str(MIN_VISIBILITY_TIMEOUT - 1)])
def test_a_visibility_timeout_shorter_than_a_countdown_and_a_run_is_refused(value):
    """Redis would hand a task still in its countdown or still running to a second worker."""
    with pytest.raises(ConfigError) as err:
        settings(CELERY_VISIBILITY_TIMEOUT=value)
    message = str(err.value)
    assert f"CELERY_VISIBILITY_TIMEOUT must be at least {MIN_VISIBILITY_TIMEOUT} seconds, got {value}" in message
    assert "MAX_COUNTDOWN" in message and "task_time_limit" in message


def test_an_empty_visibility_timeout_is_unset_and_the_minimum_is_accepted():
    assert settings(CELERY_VISIBILITY_TIMEOUT="").visibility_timeout == 300
    assert settings(CELERY_VISIBILITY_TIMEOUT="  ").visibility_timeout == 300
    assert settings().visibility_timeout == 300
    assert settings(CELERY_VISIBILITY_TIMEOUT=str(MIN_VISIBILITY_TIMEOUT)).visibility_timeout == MIN_VISIBILITY_TIMEOUT
    with pytest.raises(ConfigError, match="whole number of seconds"):
        settings(CELERY_VISIBILITY_TIMEOUT="5m")


def test_every_visibility_timeout_allowed_covers_a_countdown_a_wait_for_a_process_and_a_run():
    """The limits are derived from the tasks' constants: the longest countdown, then a wait for a pool
    process behind a task at its hard time limit, then the task's own run to that limit, stay below
    the timeout Celery is configured with; and the hard limit never drops below the minimum."""
    from tasks.bad_debt import BUSY_COUNTDOWN
    from tasks.factory import celery_config
    from tasks.failures import MAX_COUNTDOWN, POLICIES

    assert MAX_TASK_COUNTDOWN == MAX_COUNTDOWN
    assert BUSY_COUNTDOWN <= MAX_COUNTDOWN and all(p.cap <= MAX_COUNTDOWN for p in POLICIES.values())
    for vt in (MIN_VISIBILITY_TIMEOUT, MIN_VISIBILITY_TIMEOUT + 1, 300, 3600):
        config = celery_config(settings(CELERY_VISIBILITY_TIMEOUT=str(vt)))
        hard, soft = config["task_time_limit"], config["task_soft_time_limit"]
        assert config["broker_transport_options"]["visibility_timeout"] == vt
        assert MAX_COUNTDOWN + 2 * hard < vt
        assert hard >= MIN_TASK_TIME_LIMIT and 0 < soft < hard
    assert celery_config(settings())["task_time_limit"] == 117  # the README quotes it




def test_stripe_secrets_read_from_files_lose_their_trailing_newlines():
    """A secret mounted from a file ends in a newline, which made every genuine webhook fail
    verification ("signature does not match"); every other variable was already stripped."""
    loaded = settings(STRIPE_WEBHOOK_SECRET=" whsec_abc123\n", STRIPE_API_KEY="sk_test_abc123\r\n")
    assert (loaded.stripe_webhook_secret, loaded.stripe_api_key) == ("whsec_abc123", "sk_test_abc123")


@pytest.mark.parametrize("name", ["STRIPE_WEBHOOK_SECRET", "STRIPE_API_KEY"])
def test_a_stripe_secret_with_whitespace_inside_is_refused_naming_it_not_showing_it(name):
    """Stripe's secrets hold no whitespace: one inside (two values pasted together) is refused at start."""
    with pytest.raises(ConfigError) as err:
        settings(**{name: "whsec_first\nwhsec_second\n"})
    assert name in str(err.value) and "whsec_" not in str(err.value)


@pytest.mark.parametrize("name", ["STRIPE_WEBHOOK_SECRET", "STRIPE_API_KEY"])
@pytest.mark.parametrize("value", ["\ufeffwhsec_bom_secret9", "whsec_zero\u200bwidth_secret9",
                                   "whsec_joiner_secret9\u2060", "whsec_caf\u00e9_secret9"])
def test_a_stripe_secret_with_an_invisible_or_non_ascii_character_is_refused_not_shown(name, value):
    """A byte-order mark (a secret file saved as "UTF-8 with BOM") or a zero-width space (pasted from
    a web page) is no blank for str.strip() and no whitespace: it was kept, so the webhook secret
    matched no genuine signature (every webhook a 400 until Stripe disabled the endpoint) and the
    API key failed every call as a network error."""
    with pytest.raises(ConfigError) as err:
        settings(**{name: value})
    message = str(err.value)
    assert message.startswith(f"{name} holds a character that is not printable ASCII")
    assert "secret9" not in message


@pytest.mark.parametrize("value", [str(MAX_VISIBILITY_TIMEOUT + 1), "9" * 300])
def test_a_visibility_timeout_beyond_a_day_is_refused(value):
    """Any whole number was taken (one of hundreds of digits too): a dead worker's task would come
    back only once it passed, and the task time limits derived from it grew without bound."""
    with pytest.raises(ConfigError) as err:
        settings(CELERY_VISIBILITY_TIMEOUT=value)
    assert str(err.value).startswith(f"CELERY_VISIBILITY_TIMEOUT must be at most {MAX_VISIBILITY_TIMEOUT} seconds")
    assert settings(CELERY_VISIBILITY_TIMEOUT=str(MAX_VISIBILITY_TIMEOUT)).visibility_timeout == MAX_VISIBILITY_TIMEOUT


def test_the_settings_repr_shows_no_secret():
    """A Settings repr reaches output nobody guards: pytest's assertion introspection in CI logs, a
    debugger, an error report, the Celery app it hangs on (``dunning_settings``)."""
    loaded = settings(DATABASE_URL="postgresql://dunning:db-pass-1@db.internal/dunning",
                      CELERY_BROKER_URL="redis://:broker-pass-2@redis.internal:6379/0",
                      CELERY_RESULT_BACKEND="redis://:backend-pass-3@redis.internal:6379/1",
                      STRIPE_WEBHOOK_SECRET="whsec_secret4", STRIPE_API_KEY="sk_test_secret5",
                      SERVICE_TOKENS="billing:svc-secret6", SUPPORT_TOKENS="ann:sup-secret7",
                      SECRET_KEY="flask-secret8")
    shown = repr(loaded)
    for secret in ("db-pass-1", "broker-pass-2", "backend-pass-3", "whsec_secret4", "sk_test_secret5",
                   "svc-secret6", "sup-secret7", "flask-secret8"):
        assert secret not in shown
    # Still worth reading: where it connects, and who holds a token.
    assert "db.internal" in shown and "redis.internal" in shown and "billing" in shown and "ann" in shown


@pytest.mark.parametrize("value", [" ", "   ", "\n", " \t\r\n "])
def test_a_secret_key_of_blanks_only_is_refused_naming_it(value):
    """Set (so the Procfile's ${SECRET_KEY:-...} keeps it) but only blanks, it was taken as the key
    that signs every support session: a key anyone can guess."""
    with pytest.raises(ConfigError) as err:
        settings(SECRET_KEY=value)
    assert "SECRET_KEY" in str(err.value)


def test_a_secret_key_loses_the_blanks_around_it_and_an_empty_one_is_unset():
    """As the other secrets: one read from a file ends in a newline."""
    assert settings(SECRET_KEY=" flask-secret9\n").secret_key == "flask-secret9"
    unset = settings(SECRET_KEY="").secret_key
    assert len(unset) == 48 and unset != settings(SECRET_KEY="").secret_key  # one random key each


@pytest.mark.parametrize("password", ["p@ss", "pa/ss", "pa?ss", "pa:ss"])
def test_the_settings_repr_hides_a_password_that_is_not_percent_encoded(password):
    """Such a password ends the URL's address early for a parser; it is hidden all the same."""
    shown = repr(Settings(database_url=f"postgresql+psycopg2://dunning:{password}xyz@db.internal/dunning"))
    assert f"{password}xyz" not in shown and "xyz" not in shown and "dunning:***@db.internal" in shown
