"""`dunning db upgrade` onto a database where Account Management's shared tables already exist (the
real shared database): they are checked, never created, altered, indexed or dropped; what this
product reads missing stops the upgrade with a message naming it, before anything is migrated.
Where they are absent (dev, `make run`, the tests) the first migration creates a local stand-in.
Real subprocesses of the CLI, each on a fresh database of its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine

from app.migrate import downgrade, upgrade
from app.shared_tables import STAND_IN_COMMENT
from tests.integration.test_cli_recompute import dunning

# The owner's tables as another team would have them: DESIGN section 11's columns, with their own
# columns, a check constraint, an index of theirs on account_id (under their name) and a trigger.
OWNER_ACCOUNT = """
CREATE TABLE subs_account (account_id text PRIMARY KEY, bad_debt boolean, plan text NOT NULL,
                           region varchar(8) CHECK (region <> ''))
"""
OWNER_CUSTOMER = """
CREATE TABLE subs_customer (stripe_customer_id varchar(64) NOT NULL UNIQUE, account_id text NOT NULL,
                            created_at timestamptz NOT NULL DEFAULT now(), note text)
"""
OWNER_CUSTOMER_INDEX = "CREATE INDEX owner_customers_of_account ON subs_customer (account_id, stripe_customer_id)"
OWNER_TRIGGER = """
CREATE FUNCTION owner_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER owner_audit BEFORE UPDATE ON subs_account FOR EACH ROW EXECUTE FUNCTION owner_audit();
"""
OWNER_ROWS = """
INSERT INTO subs_account (account_id, bad_debt, plan) VALUES ('acct_owner_1', false, 'pro');
INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES ('cus_owner_1', 'acct_owner_1');
"""


@pytest.fixture
def owner(empty_database: str) -> Iterator[Engine]:
    engine = create_engine(empty_database, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def run(engine: Engine, *statements: str) -> None:
    with engine.connect() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def shape(engine: Engine) -> dict[str, Any]:
    """Everything about the shared tables another team defined: columns (type, default, null),
    constraints, indexes, triggers, comments, and their rows."""
    with engine.connect() as conn:
        def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]

        shared = "('subs_account', 'subs_customer')"
        return {
            "columns": rows("SELECT table_name, column_name, data_type, character_maximum_length, column_default, "
                            "is_nullable FROM information_schema.columns WHERE table_name IN " + shared +
                            " ORDER BY 1, ordinal_position"),
            "constraints": rows("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                                "FROM pg_constraint WHERE conrelid::regclass::text IN " + shared + " ORDER BY 1, 2"),
            "indexes": rows("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename IN " + shared
                            + " ORDER BY 1, 2"),
            "triggers": rows("SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
                             "WHERE tgrelid::regclass::text IN " + shared + " ORDER BY 1, 2"),
            "comments": rows("SELECT t, obj_description(t::regclass, 'pg_class') FROM unnest(ARRAY" +
                             "['subs_account', 'subs_customer']) t ORDER BY 1"),
            "rows": rows("SELECT (SELECT json_agg(a ORDER BY a.account_id) FROM subs_account a)::text, "
                         "(SELECT json_agg(c ORDER BY c.stripe_customer_id) FROM subs_customer c)::text"),
        }


def tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_db_upgrade_onto_the_owners_shared_tables_leaves_them_as_they_are(owner: Engine, empty_database: str):
    run(owner, OWNER_ACCOUNT, OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX, OWNER_TRIGGER, OWNER_ROWS)
    before = shape(owner)

    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 0, done.stderr[-1500:]
    assert shape(owner) == before  # nothing created, altered, indexed or commented on the owner's tables
    assert {"subs_dunning", "subs_mandate", "stripe_event", "alembic_version"} <= tables(owner)
    with owner.connect() as conn:
        references = conn.exec_driver_sql(
            "SELECT conname FROM pg_constraint WHERE contype = 'f' "
            "AND confrelid IN ('subs_account'::regclass, 'subs_customer'::regclass)").fetchall()
    assert references == []

    # The product runs on them: a recompute reads the owner's rows and writes subs_account.bad_debt only.
    recomputed = dunning("recompute", "acct_owner_1", database_url=empty_database)
    assert recomputed.returncode == 0, recomputed.stderr[-1500:]
    assert "account acct_owner_1: current" in recomputed.stdout

    downgrade(empty_database, "base")  # drops this product's tables, never the owner's
    assert tables(owner) & {"subs_dunning", "stripe_event"} == set()
    assert {"subs_account", "subs_customer"} <= tables(owner)
    assert shape(owner) == before


def test_db_upgrade_without_the_shared_tables_creates_the_stand_in_and_downgrade_drops_it(
        owner: Engine, empty_database: str):
    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 0, done.stderr[-1500:]
    made = shape(owner)
    assert made["comments"] == [("subs_account", STAND_IN_COMMENT), ("subs_customer", STAND_IN_COMMENT)]
    index = "CREATE INDEX ix_subs_customer_account_id ON public.subs_customer USING btree (account_id)"
    assert ("subs_customer", "ix_subs_customer_account_id", index) in made["indexes"]

    downgrade(empty_database, "base")
    assert tables(owner) == {"alembic_version"}
    upgrade(empty_database)  # and again, as on a developer's machine
    assert {"subs_account", "subs_customer", "subs_dunning"} <= tables(owner)


UNFIT = {
    "bad_debt missing": (
        [OWNER_ACCOUNT.replace("bad_debt boolean, ", ""), OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX],
        "column subs_account.bad_debt is missing"),
    "bad_debt not boolean": (
        [OWNER_ACCOUNT.replace("bad_debt boolean", "bad_debt integer"), OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX],
        "column subs_account.bad_debt is integer, expected boolean"),
    "customer account_id missing": (
        [OWNER_ACCOUNT, OWNER_CUSTOMER.replace("account_id text NOT NULL,", ""),
         "CREATE INDEX owner_by_customer ON subs_customer (stripe_customer_id)"],
        "column subs_customer.account_id is missing"),
    "created_at missing": (
        [OWNER_ACCOUNT, OWNER_CUSTOMER.replace("created_at timestamptz NOT NULL DEFAULT now(), ", ""),
         OWNER_CUSTOMER_INDEX],
        "column subs_customer.created_at is missing"),
    "no index on subs_customer.account_id": (
        [OWNER_ACCOUNT, OWNER_CUSTOMER],
        "subs_customer.account_id has no index"),
    "stripe_customer_id not unique": (
        [OWNER_ACCOUNT, OWNER_CUSTOMER.replace("NOT NULL UNIQUE", "NOT NULL"), OWNER_CUSTOMER_INDEX],
        "subs_customer.stripe_customer_id has no unique index"),
    "subs_customer absent": (
        [OWNER_ACCOUNT],
        "table subs_customer is missing"),
}


@pytest.mark.parametrize("case", list(UNFIT))
def test_db_upgrade_onto_shared_tables_lacking_what_it_reads_names_it_and_migrates_nothing(
        case: str, owner: Engine, empty_database: str):
    statements, named = UNFIT[case]
    run(owner, *statements)
    before = tables(owner)

    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 2, done.stderr[-1500:]
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.stderr.startswith("error: the shared tables") and named in done.stderr, done.stderr
    assert tables(owner) == before  # nothing migrated, the owner's tables untouched


def test_db_upgrade_refuses_the_owners_shared_tables_in_a_schema_the_search_path_leaves_out(
        owner: Engine, empty_database: str):
    """The owner's tables in their own schema, which the upgrade's session does not see: the first
    migration created empty stand-ins in public beside them, and the product then found no account
    and no customer. It now stops naming the schema, and the upgrade goes through once DATABASE_URL
    puts it on the search_path."""
    run(owner, "CREATE SCHEMA accounts")
    theirs = create_engine(empty_database, isolation_level="AUTOCOMMIT",
                           connect_args={"options": "-csearch_path=accounts"})
    try:
        run(theirs, OWNER_ACCOUNT, OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX, OWNER_ROWS)
        before = shape(theirs)
        assert tables(owner) == set()

        refused_then_migrated(owner, empty_database)
        assert shape(theirs) == before  # the owner's tables as they were
    finally:
        theirs.dispose()


def refused_then_migrated(owner: Engine, empty_database: str) -> None:

    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 2, done.stderr[-1500:]
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the shared tables subs_account and subs_customer"), done.stderr
    assert "subs_account in schema accounts; subs_customer in schema accounts" in lines[0], done.stderr
    assert "?options=-csearch_path%3Dpublic,accounts" in lines[0], done.stderr
    assert tables(owner) == set()  # nothing created in public: no stand-in, no table of ours
    with owner.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'accounts'").scalar() == 2

    separator = "&" if "?" in empty_database else "?"
    on_path = f"{empty_database}{separator}options=-csearch_path%3Dpublic,accounts"
    done = dunning("db", "upgrade", database_url=on_path)
    assert done.returncode == 0, done.stderr[-1500:]
    assert {"subs_dunning", "stripe_event", "alembic_version"} <= tables(owner)
    assert not {"subs_account", "subs_customer"} & tables(owner)  # the owner's, read where they are
    recomputed = dunning("recompute", "acct_owner_1", database_url=on_path)
    assert recomputed.returncode == 0, recomputed.stderr[-1500:]
    assert "account acct_owner_1: current" in recomputed.stdout


def test_db_upgrade_names_the_schema_of_a_shared_table_the_search_path_leaves_out(owner: Engine, empty_database: str):
    """One shared table on the search_path, the other in a schema it leaves out: the message says where."""
    run(owner, "CREATE SCHEMA accounts", OWNER_ACCOUNT,
        OWNER_CUSTOMER.replace("subs_customer", "accounts.subs_customer"))

    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 2, done.stderr[-1500:]
    assert "table subs_customer is missing" in done.stderr, done.stderr
    assert "which leaves out schema accounts holding a subs_customer" in done.stderr, done.stderr
    assert tables(owner) == {"subs_account"}
