"""The shared tables (DESIGN section 2): ``subs_account`` and ``subs_customer`` belong to Account
Management. This product reads them and writes ``subs_account.bad_debt`` only.

``dunning db upgrade`` meets them in one of two worlds:

* absent (a developer's database, `make run`, the tests): the first migration creates them as a local
  stand-in, marked by ``STAND_IN_COMMENT``; downgrading that migration drops only tables so marked.
  Absent means from the whole database, not only from the session's search_path: tables of those
  names in a schema the search_path leaves out are the owner's, which the session would not see, and
  ``require_reachable`` stops the upgrade naming that schema (a stand-in there would leave this
  product reading empty tables beside the owner's: no account, no customer).
* present (the real shared database): they are the owner's. No migration creates, alters, comments
  or indexes them; ``require_contract`` checks what this product reads is there and stops the
  upgrade with a message naming what is missing (the CLI prints it, exit 2) otherwise.

The owner changes their tables when they like (an index dropped, a column's type changed or renamed),
after this product was installed on them: ``require_fit`` checks both again at every ``dunning db
upgrade`` of a database past the first migration (app/migrate.py upgrade: at head too, and at a newer
release's revision), before anything is migrated, so each deploy (and each pod's init container)
stops on what the product would fail or slow down on.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from app.config import ConfigError

SHARED = ("subs_account", "subs_customer")
STAND_IN_COMMENT = ("local stand-in created by dunning db upgrade (the shared table of Account Management "
                    "was absent); dunning db downgrade drops it")

TEXT = ("text", "character varying")


@dataclass(frozen=True)
class Column:
    table: str
    name: str
    types: tuple[str, ...]  # format_type() spellings accepted (a varchar's length is ignored)
    why: str


# What this product reads (and, for bad_debt, writes): DESIGN section 11's columns, plus
# subs_customer.created_at, which the re-drive of unroutable events pages by (app/redrive.py MAPPED).
COLUMNS = (
    Column("subs_account", "account_id", TEXT, "DESIGN section 11"),
    Column("subs_account", "bad_debt", ("boolean",), "DESIGN section 11; the one column this product writes"),
    Column("subs_customer", "stripe_customer_id", TEXT, "DESIGN section 11"),
    Column("subs_customer", "account_id", TEXT, "DESIGN section 11"),
    Column("subs_customer", "created_at", ("timestamp with time zone",),
           "not in DESIGN's contract, but the re-drive of unroutable events finds newly mapped customers by it"),
)

# Indexes this product's reads need on the owner's tables: (table, leading column, unique, why, the
# statement that adds one). A unique one must be on that column alone.
INDEXES = (
    ("subs_account", "account_id", True, "its primary key (DESIGN section 11)",
     "ALTER TABLE subs_account ADD PRIMARY KEY (account_id)"),
    ("subs_customer", "stripe_customer_id", True, "unique (DESIGN section 11)",
     "ALTER TABLE subs_customer ADD UNIQUE (stripe_customer_id)"),
    # ix_subs_customer_account_id where this product creates the table: gather, refile, the sweep's
    # batches and retry dispatch find an account's customers by it; without it each of those reads
    # the whole table.
    ("subs_customer", "account_id", False, "an index on it (every recompute finds an account's customers by it)",
     "CREATE INDEX CONCURRENTLY ix_subs_customer_account_id ON subs_customer (account_id)"),
)


class SharedTablesUnfit(ConfigError):
    """The owner's shared tables lack what this product reads: the message names it."""


def present(conn: Connection) -> set[str]:
    """The shared tables the search path finds (tables, partitioned tables or views)."""
    rows = conn.exec_driver_sql(
        "SELECT t.name FROM unnest(%(names)s::text[]) AS t(name) WHERE to_regclass(t.name) IS NOT NULL",
        {"names": list(SHARED)})
    return {r[0] for r in rows}


def elsewhere(conn: Connection) -> dict[str, list[str]]:
    """The schemas, by shared table, holding a table (or view) of that name that the search path
    does not find: the system's schemas and other sessions' temporary ones aside."""
    rows = conn.exec_driver_sql(
        "SELECT c.relname, n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        " WHERE c.relname = ANY(%(names)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%' "
        "   AND to_regclass(c.relname) IS NULL ORDER BY 2, 1",
        {"names": list(SHARED)})
    found: dict[str, list[str]] = {}
    for table, schema in rows:
        found.setdefault(table, []).append(schema)
    return found


def require_reachable(conn: Connection) -> None:
    """Raises SharedTablesUnfit when the search path finds neither shared table but the database holds
    either in another schema: the owner's, which this session would not see (and the first migration
    would create empty stand-ins beside)."""
    if present(conn):
        return
    hidden = elsewhere(conn)
    if not hidden:
        return
    schemas = sorted({schema for found in hidden.values() for schema in found})
    ours = conn.exec_driver_sql("SELECT current_schema()").scalar() or "public"
    path = conn.exec_driver_sql("SHOW search_path").scalar()
    where = "; ".join(f"{table} in schema {', '.join(found)}" for table, found in sorted(hidden.items()))
    raise SharedTablesUnfit(
        f"the shared tables subs_account and subs_customer (Account Management's) are in this database "
        f"({where}) but not on the search_path ({path}); nothing was migrated, and dunning db upgrade "
        f"creates no stand-in beside them: add the schema to the search_path of every session, e.g. "
        f"`?options=-csearch_path%3D{ours},{','.join(schemas)}` in DATABASE_URL (or ALTER ROLE ... SET "
        f"search_path), and run the upgrade again")


def created_here(conn: Connection, table: str) -> bool:
    """Whether ``table`` is this product's stand-in (created by the first migration), by its comment."""
    comment = conn.exec_driver_sql("SELECT obj_description(to_regclass(%(t)s), 'pg_class')", {"t": table}).scalar()
    return comment == STAND_IN_COMMENT


def problems(conn: Connection) -> list[str]:
    """What the owner's shared tables lack that this product reads, one sentence each; [] when fit."""
    found = present(conn)
    missing = [t for t in SHARED if t not in found]
    if not found:  # neither (a database migrated before: the owner dropped them, or DATABASE_URL is another)
        return [f"tables {' and '.join(SHARED)} are missing (this product creates them only on a first install; "
                "check DATABASE_URL and the search_path)"]
    if missing:
        hidden = elsewhere(conn)
        return [f"table {t} is missing (the other shared table, {', '.join(sorted(found))}, exists: the "
                "shared tables are Account Management's, and this product creates neither beside the "
                "other's; check DATABASE_URL and the search_path"
                + (f", which leaves out schema {', '.join(hidden[t])} holding a {t}" if t in hidden else "")
                + ")" for t in missing]
    out = []
    types = {(t, c): ty for t, c, ty in conn.exec_driver_sql(
        "SELECT %(t1)s, a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
        " WHERE a.attrelid = to_regclass(%(t1)s) AND a.attnum > 0 AND NOT a.attisdropped "
        "UNION ALL SELECT %(t2)s, a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
        " WHERE a.attrelid = to_regclass(%(t2)s) AND a.attnum > 0 AND NOT a.attisdropped",
        {"t1": SHARED[0], "t2": SHARED[1]})}
    for col in COLUMNS:
        have = types.get((col.table, col.name))
        if have is None:
            out.append(f"column {col.table}.{col.name} is missing ({col.why})")
        elif have not in col.types:
            out.append(f"column {col.table}.{col.name} is {have}, expected {' or '.join(col.types)} ({col.why})")
    if out:
        return out
    # Valid, non-partial indexes, by their leading key column (an expression's is attnum 0: no name).
    indexes = conn.exec_driver_sql(
        "SELECT c.relname, a.attname, i.indisunique, i.indnkeyatts FROM pg_index i "
        "  JOIN pg_class c ON c.oid = i.indrelid "
        "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        " WHERE i.indrelid IN (to_regclass(%(t1)s), to_regclass(%(t2)s)) AND i.indisvalid AND i.indpred IS NULL",
        {"t1": SHARED[0], "t2": SHARED[1]}).fetchall()
    for table, column, unique, why, statement in INDEXES:
        if not any(t == table and c == column and (not unique or (u and n == 1)) for t, c, u, n in indexes):
            out.append(f"{table}.{column} has no {'unique index' if unique else 'index'}: this product needs "
                       f"{why}; the table is Account Management's, which adds it, e.g. `{statement}`")
    return out


def require_contract(conn: Connection) -> None:
    """Raises SharedTablesUnfit naming every problem when the owner's shared tables lack what this
    product reads."""
    found = problems(conn)
    if found:
        raise SharedTablesUnfit(
            "the shared tables subs_account and subs_customer (Account Management's, found in this database) "
            "lack what this product reads; nothing was migrated, and dunning db upgrade creates or changes "
            "neither table: "
            + "; ".join(found))


def require_fit(conn: Connection) -> None:
    """For a database the first migration has run on: raises SharedTablesUnfit when the shared tables
    are off the search_path (require_reachable) or lack what this product reads (require_contract),
    the owner's or the stand-in alike."""
    require_reachable(conn)
    require_contract(conn)
