"""Persistence of the model catalogue behind a small interface (ModelStore), with SQLite as the default
implementation. A PostgreSQL store implements the same interface."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hotslot.errors import FailedPrecondition, NotFound, Reason, ResourceExhausted
from hotslot.manifest import Manifest

log = logging.getLogger(__name__)

KIND_PIPELINE = "DIFFUSERS_PIPELINE"
KIND_LORA = "LORA_ADAPTER"


@dataclass(frozen=True)
class ModelRecord:
    """One revision of a model."""

    model_id: str
    revision: int
    kind: str
    base_model_id: str
    source: str
    labels: dict[str, str]
    manifest: Manifest
    create_time: float = field(default=0.0)


class ModelStore(Protocol):
    """What the registry core needs from a database. Every method is atomic."""

    def add_revision(self, record: ModelRecord) -> tuple[ModelRecord, bool]:
        """Stores `record` as a new revision unless the latest revision has the same manifest, kind, base and
        source; then that revision's labels are replaced and it is returned with created=False. The revision
        number in `record` is ignored. Raises NotFound if a LoRA's base does not exist, FailedPrecondition if the
        id exists with another kind."""
        ...

    def get(self, model_id: str, revision: int = 0) -> ModelRecord:
        """The given revision, or the latest when 0. Raises NotFound."""
        ...

    def list_latest(
        self, *, after_id: str, limit: int, kind: str | None, labels: dict[str, str]
    ) -> list[ModelRecord]:
        """Latest revision of each model with id > after_id, ordered by id, at most `limit`."""
        ...

    def delete(self, model_id: str) -> tuple[ModelRecord, int]:
        """Deletes every revision; returns the latest one and how many were removed. Raises NotFound, or
        FailedPrecondition if adapters name it as their base."""
        ...

    def close(self) -> None: ...


# Each entry moves the schema from version i to i+1. Never edit an entry that has shipped; append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE models (
        model_id        TEXT PRIMARY KEY,
        kind            TEXT NOT NULL,
        latest_revision INTEGER NOT NULL
    );
    CREATE TABLE revisions (
        model_id        TEXT NOT NULL REFERENCES models(model_id) ON DELETE CASCADE,
        revision        INTEGER NOT NULL,
        kind            TEXT NOT NULL,
        base_model_id   TEXT NOT NULL DEFAULT '',
        source          TEXT NOT NULL,
        labels_json     TEXT NOT NULL DEFAULT '{}',
        manifest_json   TEXT NOT NULL,
        manifest_digest TEXT NOT NULL,
        create_time     REAL NOT NULL,
        PRIMARY KEY (model_id, revision)
    );
    CREATE INDEX revisions_base ON revisions(base_model_id) WHERE base_model_id != '';
    """,
]


class SQLiteModelStore:
    """SQLite in WAL mode. One connection per thread; writers take the database lock up front (BEGIN IMMEDIATE)
    so concurrent registrations, from threads or processes, serialize instead of failing half-way."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrate()

    # -- connections -------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite ends the transaction itself on some errors (SQLITE_FULL)
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as error:
            full = self._full_disk(error)
            if full is None:
                raise
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise full from error

    def _full_disk(self, error: sqlite3.Error) -> ResourceExhausted | None:
        """SQLITE_FULL ("database or disk is full") as RESOURCE_EXHAUSTED naming the disk; the transaction is
        rolled back, and reads go on."""
        if getattr(error, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL and "disk is full" not in str(error):
            return None
        try:
            st = os.statvfs(Path(self.path).parent)
            free = f"{st.f_bavail * st.f_frsize} bytes free"
        except (OSError, TypeError):
            free = "free space unknown"
        log.warning("registry database disk full", extra={"path": str(self.path)})
        return ResourceExhausted(
            f"the disk holding the registry database {self.path} is full ({free}; a write needs at least a few "
            "pages of 4 KiB for the database and its write-ahead log): free space there and retry"
        )

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row["version"] if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > len(MIGRATIONS):
                raise FailedPrecondition(
                    f"database {self.path} has schema version {version}, newer than this hotslot "
                    f"({len(MIGRATIONS)}); upgrade hotslot"
                )
            for i in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (i + 1,))

    def schema_version(self) -> int:
        return int(self._conn().execute("SELECT version FROM schema_version").fetchone()["version"])

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass  # closed from its own thread already
            self._all.clear()
        self._local = threading.local()

    # -- operations --------------------------------------------------------------------------------------
    @staticmethod
    def _record(row: sqlite3.Row) -> ModelRecord:
        return ModelRecord(
            model_id=row["model_id"],
            revision=row["revision"],
            kind=row["kind"],
            base_model_id=row["base_model_id"],
            source=row["source"],
            labels=json.loads(row["labels_json"]),
            manifest=Manifest.from_json(row["manifest_json"]),
            create_time=row["create_time"],
        )

    def add_revision(self, record: ModelRecord) -> tuple[ModelRecord, bool]:
        digest = record.manifest.digest
        labels_json = json.dumps(record.labels, sort_keys=True)
        with self._write() as conn:
            if record.base_model_id:
                base = conn.execute(
                    "SELECT kind FROM models WHERE model_id = ?", (record.base_model_id,)
                ).fetchone()
                if base is None:
                    raise NotFound(f"base model {record.base_model_id!r} is not registered", reason=Reason.MODEL_NOT_FOUND)
                if base["kind"] != KIND_PIPELINE:
                    raise FailedPrecondition(
                        f"base model {record.base_model_id!r} is a {base['kind']}, not a DIFFUSERS_PIPELINE"
                    )
            model = conn.execute(
                "SELECT kind, latest_revision FROM models WHERE model_id = ?", (record.model_id,)
            ).fetchone()
            if model is not None and model["kind"] != record.kind:
                raise FailedPrecondition(
                    f"model {record.model_id!r} is registered as {model['kind']}; delete it first to register "
                    f"it as {record.kind}"
                )
            if model is not None:
                latest = conn.execute(
                    "SELECT * FROM revisions WHERE model_id = ? AND revision = ?",
                    (record.model_id, model["latest_revision"]),
                ).fetchone()
                if (
                    latest["manifest_digest"] == digest
                    and latest["base_model_id"] == record.base_model_id
                    and latest["source"] == record.source
                ):
                    conn.execute(
                        "UPDATE revisions SET labels_json = ? WHERE model_id = ? AND revision = ?",
                        (labels_json, record.model_id, latest["revision"]),
                    )
                    return self._record(
                        conn.execute(
                            "SELECT * FROM revisions WHERE model_id = ? AND revision = ?",
                            (record.model_id, latest["revision"]),
                        ).fetchone()
                    ), False
                revision = model["latest_revision"] + 1
                conn.execute(
                    "UPDATE models SET latest_revision = ? WHERE model_id = ?", (revision, record.model_id)
                )
            else:
                revision = 1
                conn.execute(
                    "INSERT INTO models (model_id, kind, latest_revision) VALUES (?, ?, 1)",
                    (record.model_id, record.kind),
                )
            now = time.time()
            conn.execute(
                "INSERT INTO revisions (model_id, revision, kind, base_model_id, source, labels_json,"
                " manifest_json, manifest_digest, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.model_id,
                    revision,
                    record.kind,
                    record.base_model_id,
                    record.source,
                    labels_json,
                    record.manifest.to_json(),
                    digest,
                    now,
                ),
            )
        return ModelRecord(
            model_id=record.model_id,
            revision=revision,
            kind=record.kind,
            base_model_id=record.base_model_id,
            source=record.source,
            labels=dict(record.labels),
            manifest=record.manifest,
            create_time=now,
        ), True

    def get(self, model_id: str, revision: int = 0) -> ModelRecord:
        conn = self._conn()
        if revision == 0:
            row = conn.execute(
                "SELECT r.* FROM revisions r JOIN models m"
                " ON r.model_id = m.model_id AND r.revision = m.latest_revision WHERE m.model_id = ?",
                (model_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"model {model_id!r} is not registered", reason=Reason.MODEL_NOT_FOUND)
        else:
            row = conn.execute(
                "SELECT * FROM revisions WHERE model_id = ? AND revision = ?", (model_id, revision)
            ).fetchone()
            if row is None:
                exists = conn.execute("SELECT latest_revision FROM models WHERE model_id = ?", (model_id,)).fetchone()
                if exists is None:
                    raise NotFound(f"model {model_id!r} is not registered", reason=Reason.MODEL_NOT_FOUND)
                raise NotFound(
                    f"model {model_id!r} has no revision {revision} (latest is {exists['latest_revision']})",
                    reason=Reason.MODEL_NOT_FOUND,
                )
        return self._record(row)

    def list_latest(
        self, *, after_id: str, limit: int, kind: str | None, labels: dict[str, str]
    ) -> list[ModelRecord]:
        sql = [
            "SELECT r.* FROM revisions r JOIN models m"
            " ON r.model_id = m.model_id AND r.revision = m.latest_revision WHERE m.model_id > ?"
        ]
        params: list[object] = [after_id]
        if kind:
            sql.append("AND m.kind = ?")
            params.append(kind)
        for key, value in sorted(labels.items()):
            sql.append("AND json_extract(r.labels_json, ?) = ?")
            params.extend(["$." + json.dumps(key), value])
        sql.append("ORDER BY m.model_id LIMIT ?")
        params.append(limit)
        return [self._record(row) for row in self._conn().execute(" ".join(sql), params)]

    def delete(self, model_id: str) -> tuple[ModelRecord, int]:
        with self._write() as conn:
            latest = conn.execute(
                "SELECT r.* FROM revisions r JOIN models m"
                " ON r.model_id = m.model_id AND r.revision = m.latest_revision WHERE m.model_id = ?",
                (model_id,),
            ).fetchone()
            if latest is None:
                raise NotFound(f"model {model_id!r} is not registered", reason=Reason.MODEL_NOT_FOUND)
            dependents = [
                row["model_id"]
                for row in conn.execute(
                    "SELECT DISTINCT r.model_id FROM revisions r JOIN models m"
                    " ON r.model_id = m.model_id AND r.revision = m.latest_revision"
                    " WHERE r.base_model_id = ? ORDER BY r.model_id LIMIT 5",
                    (model_id,),
                )
            ]
            if dependents:
                raise FailedPrecondition(
                    f"model {model_id!r} is the base of LoRA adapter(s) {', '.join(dependents)}; delete those first"
                )
            count = conn.execute("DELETE FROM revisions WHERE model_id = ?", (model_id,)).rowcount
            conn.execute("DELETE FROM models WHERE model_id = ?", (model_id,))
        return self._record(latest), count
