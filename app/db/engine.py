"""Engine and session factory. SQLite (embedded) is shared by the API and a worker process, so it runs in WAL
mode with a busy timeout; PostgreSQL needs nothing special."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable

from app.db.tables import Base


def make_engine(url: str) -> Engine:
    # max_overflow=-1: a checkout never waits. Sync routes hold their connection while they wait for a thread
    # to close the session; with a bounded pool, ~55 concurrent requests left every thread waiting for a
    # connection held by a request waiting for a thread, until the pool timeout (a 500 after 30 s). Unbounded,
    # a burst past the database's own connection limit gets its error instead (503 with Retry-After).
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": -1}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["connect_args"] = {"connect_timeout": 5}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def init_db(engine: Engine) -> None:
    """Create missing tables, then add what later pre-release versions added to existing ones.

    Idempotent. There are no migrations before v1: ``create_all`` makes new tables but never touches existing
    ones, so ``_add_missing_columns`` adds columns that are nullable or have a server default (e.g. ``tenant``,
    whose default puts old rows in tenant ``default``) and the indexes that go with them. Anything else (a
    changed type, a new NOT NULL column without a default) is refused with a message, not guessed at.
    ``_relax_not_null`` drops NOT NULL from columns that became nullable (the datasets' ``sha256``, ``arrays``,
    ``n_samples``, ``size_bytes``: unknown for data registered by reference).
    """
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    _relax_not_null(engine)


def _add_missing_columns(engine: Engine) -> None:
    """The API, the embedded worker and production workers all call init_db at start, possibly at once: each
    ALTER runs in its own transaction and losing the race to another process (the column is there now) is
    fine."""
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in inspect(engine).get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        for column in missing:
            if column.server_default is None and not column.nullable:
                raise RuntimeError(
                    f"the database's table {table.name!r} predates column {column.name!r}, which cannot be "
                    "added automatically; start with an empty data directory / database"
                )
            ddl = CreateColumn(column).compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
            except DBAPIError:
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
        if missing:
            for index in table.indexes:
                try:
                    with engine.begin() as conn:
                        index.create(conn, checkfirst=True)
                except DBAPIError:
                    if index.name not in {i["name"] for i in inspect(engine).get_indexes(table.name)}:
                        raise


def _relax_not_null(engine: Engine) -> None:
    """Columns nullable in the tables but NOT NULL in the database: PostgreSQL drops the constraint in place
    (idempotent); SQLite cannot alter a column, so the table is rebuilt (SQLite's documented recipe), in one
    write transaction that first checks again, under the lock, that no other process rebuilt it already."""
    for table in Base.metadata.sorted_tables:
        stale = _not_null_but_nullable(engine, table)
        if not stale:
            continue
        if engine.dialect.name == "sqlite":
            _rebuild_sqlite_table(engine, table)
            continue
        with engine.begin() as conn:
            for name in stale:
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ALTER COLUMN "{name}" DROP NOT NULL')


def _not_null_but_nullable(engine: Engine, table: Table) -> list[str]:
    have = {c["name"]: c for c in inspect(engine).get_columns(table.name)}
    return [
        c.name
        for c in table.columns
        if c.nullable and not c.primary_key and c.name in have and not have[c.name]["nullable"]
    ]


def _rebuild_sqlite_table(engine: Engine, table: Table) -> None:
    """Create ``<table>__relaxed`` from the current definition, copy the rows, drop the old table, rename, and
    create the indexes again. ``BEGIN IMMEDIATE`` on a driver connection in autocommit mode, so every step
    (DDL included) is one transaction: a crash leaves the old table as it was."""
    new = f"{table.name}__relaxed"
    relaxed = {c.name for c in table.columns if c.nullable and not c.primary_key}
    raw = engine.raw_connection()
    dbapi: Any = raw.driver_connection
    previous = dbapi.isolation_level
    dbapi.isolation_level = None
    try:
        cur = dbapi.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            info = cur.execute(f"PRAGMA table_info({table.name})").fetchall()  # cid, name, type, notnull, ...
            if not any(row[1] in relaxed and row[3] for row in info):
                cur.execute("ROLLBACK")  # another process rebuilt it first
                return
            columns = ", ".join(f'"{row[1]}"' for row in info if row[1] in table.columns)
            cur.execute(f"DROP TABLE IF EXISTS {new}")
            cur.execute(
                str(CreateTable(table.to_metadata(MetaData(), name=new)).compile(dialect=engine.dialect))
            )
            cur.execute(f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {table.name}")
            cur.execute(f"DROP TABLE {table.name}")
            cur.execute(f"ALTER TABLE {new} RENAME TO {table.name}")
            for index in table.indexes:
                cur.execute(str(CreateIndex(index).compile(dialect=engine.dialect)))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
    finally:
        dbapi.isolation_level = previous
        raw.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
