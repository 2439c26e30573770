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


def revision_of(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version"))


def refused(done: Any, named: str) -> None:
    """The upgrade stopped as 0001's check stops it: one `error:` line naming the problem, exit 2."""
    assert done.returncode == 2, (done.stdout + done.stderr)[-1500:]
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the shared tables subs_account and subs_customer"), done.stderr
    assert named in lines[0], done.stderr
    assert "database upgraded" not in done.stdout


# What the owner may change in their tables after this product was installed on them.
DRIFT = {
    "index on subs_customer.account_id dropped": (
        "DROP INDEX owner_customers_of_account", "subs_customer.account_id has no index"),
    "created_at no longer timestamptz": (
        "ALTER TABLE subs_customer ALTER COLUMN created_at TYPE timestamp",
        "column subs_customer.created_at is timestamp without time zone, expected timestamp with time zone"),
    "bad_debt renamed": (
        "ALTER TABLE subs_account RENAME COLUMN bad_debt TO is_bad_debt", "column subs_account.bad_debt is missing"),
    "subs_customer dropped": ("DROP TABLE subs_customer", "table subs_customer is missing"),
    "both dropped": ("DROP TABLE subs_customer, subs_account",
                     "tables subs_account and subs_customer are missing"),
}


@pytest.mark.parametrize("case", list(DRIFT))
def test_db_upgrade_at_head_checks_the_owners_tables_again_and_stops_on_what_they_no_longer_have(
        case: str, owner: Engine, empty_database: str):
    """The check ran in the first migration only: once installed, the owner's later changes (an index
    dropped, a column's type changed or renamed) were never caught; `dunning db upgrade` (each pod's
    init container) said `database upgraded to head` and the product failed or scanned the table."""
    run(owner, OWNER_ACCOUNT, OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX, OWNER_ROWS)
    assert dunning("db", "upgrade", database_url=empty_database).returncode == 0
    again = dunning("db", "upgrade", database_url=empty_database)
    assert again.returncode == 0 and "database upgraded to head" in again.stdout, again.stderr[-1500:]
    at = revision_of(owner)

    statement, named = DRIFT[case]
    run(owner, statement)
    before = snapshot(owner)
    refused(dunning("db", "upgrade", database_url=empty_database), named)
    assert revision_of(owner) == at and snapshot(owner) == before

    # A downgrade is not held by it: it drops this product's tables, never the owner's.
    downgrade(empty_database, "base")
    assert tables(owner) & {"subs_dunning", "stripe_event"} == set() and snapshot(owner)[1] == before[1]


def snapshot(engine: Engine) -> tuple[set[str], dict[str, Any] | None]:
    """The tables, and the shared tables' shape while both exist."""
    names = tables(engine)
    return names, shape(engine) if {"subs_account", "subs_customer"} <= names else None


def test_db_upgrade_behind_head_stops_on_the_owners_drift_before_migrating_anything(
        owner: Engine, empty_database: str):
    run(owner, OWNER_ACCOUNT, OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX, OWNER_ROWS)
    upgrade(empty_database, "0001")
    run(owner, "DROP INDEX owner_customers_of_account")

    refused(dunning("db", "upgrade", database_url=empty_database), "subs_customer.account_id has no index")
    assert revision_of(owner) == ["0001"]  # nothing migrated
    refused(dunning("db", "upgrade", "+1", database_url=empty_database), "subs_customer.account_id has no index")
    assert revision_of(owner) == ["0001"]

    run(owner, OWNER_CUSTOMER_INDEX)  # the owner adds it back: the upgrade goes through
    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 0, done.stderr[-1500:]
    assert revision_of(owner) != ["0001"]


def test_db_upgrade_at_a_newer_releases_revision_still_checks_the_owners_tables(owner: Engine, empty_database: str):
    """A rollback: the database is left at the newer release's revision, but this code still reads the
    owner's tables, so their drift is said as anywhere else."""
    run(owner, OWNER_ACCOUNT, OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX, OWNER_ROWS)
    assert dunning("db", "upgrade", database_url=empty_database).returncode == 0
    run(owner, "UPDATE alembic_version SET version_num = 'f00dfeed_newer'")
    left = dunning("db", "upgrade", database_url=empty_database)
    assert left.returncode == 0 and "which this code does not have" in left.stderr, left.stderr[-1500:]

    run(owner, "ALTER TABLE subs_account ALTER COLUMN bad_debt TYPE integer USING bad_debt::int")
    refused(dunning("db", "upgrade", database_url=empty_database),
            "column subs_account.bad_debt is integer, expected boolean")
    assert revision_of(owner) == ["f00dfeed_newer"]


def test_db_upgrade_refuses_a_search_path_that_no_longer_reaches_the_owners_tables(owner: Engine, empty_database: str):
    """Installed with the owner's schema on the search_path; DATABASE_URL later loses it: the product
    would find no account and no customer, while the upgrade said `database upgraded to head`."""
    run(owner, "CREATE SCHEMA accounts")
    theirs = create_engine(empty_database, isolation_level="AUTOCOMMIT",
                           connect_args={"options": "-csearch_path=accounts"})
    try:
        run(theirs, OWNER_ACCOUNT, OWNER_CUSTOMER, OWNER_CUSTOMER_INDEX, OWNER_ROWS)
    finally:
        theirs.dispose()
    separator = "&" if "?" in empty_database else "?"
    on_path = f"{empty_database}{separator}options=-csearch_path%3Dpublic,accounts"
    assert dunning("db", "upgrade", database_url=on_path).returncode == 0

    refused(dunning("db", "upgrade", database_url=empty_database),
            "subs_account in schema accounts; subs_customer in schema accounts")
    assert not {"subs_account", "subs_customer"} & tables(owner)  # no stand-in created beside them
    assert dunning("db", "upgrade", database_url=on_path).returncode == 0


def test_db_upgrade_at_head_on_the_stand_in_is_unchanged(owner: Engine, empty_database: str):
    assert dunning("db", "upgrade", database_url=empty_database).returncode == 0
    again = dunning("db", "upgrade", database_url=empty_database)
    assert again.returncode == 0 and again.stderr == "", again.stderr[-1500:]
    assert "database upgraded to head" in again.stdout
