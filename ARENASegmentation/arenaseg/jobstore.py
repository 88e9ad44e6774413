"""The server's store: users and their hashed tokens, uploads, jobs and their events, in one
SQLite database ``DATA/server.sqlite`` (standard library only), and uploaded or produced files
under ``DATA/blobs`` named by their SHA-256 (never by a name a client gave).

Jobs move ``queued`` → ``running`` → ``done``, ``failed`` or ``cancelled``. The queue lives in
the database, so it survives a restart: queued jobs stay queued, a job that was running when the
server stopped is marked ``failed`` with an ``error`` event (:meth:`JobStore.recover`).

Every query that reads a job or an upload takes the user: another user's job or file is simply
not found.

The ``audit`` table says who did what on which upload: time (UTC, ISO 8601), user name (none for
a refused token), action (:data:`AUDIT_ACTIONS`), job id, the files' SHA-256s (comma-separated:
the upload received, the uploads a job reads, the output fetched), the client's address and a
detail; never a token. ``arenaseg audit --data
DIR`` prints it; or ``sqlite3 DIR/server.sqlite 'SELECT * FROM audit'``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
from pathlib import Path

from .errors import ArenaError

DATABASE = "server.sqlite"
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
#: Events that end a job's event stream.
FINAL_EVENTS = ("done", "error", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
                                  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, user_id INTEGER NOT NULL
                                   REFERENCES users(id), created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (user_id INTEGER NOT NULL REFERENCES users(id),
                                    sha256 TEXT NOT NULL, suffix TEXT NOT NULL,
                                    size INTEGER NOT NULL, created REAL NOT NULL,
                                    PRIMARY KEY (user_id, sha256));
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, user_id INTEGER NOT NULL
                                 REFERENCES users(id), command TEXT NOT NULL,
                                 state TEXT NOT NULL, request TEXT NOT NULL, worker_job TEXT,
                                 created REAL NOT NULL, started REAL, finished REAL,
                                 message TEXT, result TEXT);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, created);
CREATE TABLE IF NOT EXISTS events (job_id TEXT NOT NULL REFERENCES jobs(id), seq INTEGER NOT NULL,
                                   event TEXT NOT NULL, PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, time TEXT NOT NULL, user TEXT,
                                  action TEXT NOT NULL, job_id TEXT, sha256s TEXT, client TEXT,
                                  detail TEXT);
"""
#: What the audit log records (:meth:`JobStore.audit`): a file received, a job submitted (its
#: command), a cancel, an output fetched, and a request refused (401, 404 on a job, 429).
AUDIT_ACTIONS = ("upload", "adapt", "segment", "cancel", "download", "denied")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def sniff_suffix(head: bytes) -> str | None:
    """The file type of an upload from its first bytes (at least 352 of them when there are):
    ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.safetensors``; None for anything else."""
    if head[:2] == b"\x1f\x8b":
        try:
            inner = _gunzip_head(head)
        except Exception:
            return None
        return ".nii.gz" if _is_nifti(inner) else None
    if _is_nifti(head):
        return ".nii"
    if head.startswith(b"NRRD000"):
        return ".nrrd"
    if b"ObjectType" in head[:200] or head.startswith(b"NDims"):
        return ".mha"
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length < 100_000_000 and head[8:9] == b"{":
            return ".safetensors"
    return None


def _gunzip_head(data: bytes) -> bytes:
    import zlib

    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 1024)


def _is_nifti(head: bytes) -> bool:
    return (len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0")
            and head[:4] in (struct.pack("<i", 348), struct.pack(">i", 348))) or \
           (len(head) >= 12 and head[4:8] in (b"n+2\0", b"ni2\0")
            and head[:4] in (struct.pack("<i", 540), struct.pack(">i", 540)))


class JobStore:
    """The database and the blob folder of one server data folder (thread-safe)."""

    def __init__(self, data: str | os.PathLike):
        # absolute: every job's worker runs inside its own job folder
        self.data = Path(data).resolve()
        self.blobs = self.data / "blobs"
        self.jobs_dir = self.data / "jobs"
        self.incoming = self.data / "incoming"
        for folder in (self.data, self.blobs, self.jobs_dir, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data, 0o700)  # tokens' hashes, everyone's scans
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data / DATABASE, check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, *args) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # users and tokens -------------------------------------------------------------------------

    def add_token(self, name: str) -> str:
        """A new token for user ``name`` (created when new); only its SHA-256 is stored."""
        if not name or not name.isprintable() or len(name) > 100:
            raise ArenaError(f"user name {name!r} must be 1 to 100 printable characters")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO users (name, created) VALUES (?, ?)",
                                 (name, time.time()))
                (user_id,) = self._db.execute("SELECT id FROM users WHERE name = ?",
                                              (name,)).fetchone()
                self._db.execute("INSERT INTO tokens (hash, user_id, created) VALUES (?, ?, ?)",
                                 (token_hash(token), user_id, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return token

    def user_of(self, token: str) -> int | None:
        rows = self._query("SELECT user_id FROM tokens WHERE hash = ?", token_hash(token))
        return rows[0]["user_id"] if rows else None

    def user_name(self, user_id: int) -> str:
        rows = self._query("SELECT name FROM users WHERE id = ?", user_id)
        return rows[0]["name"] if rows else f"#{user_id}"

    # files ------------------------------------------------------------------------------------

    def blob_path(self, sha256: str, suffix: str) -> Path:
        return self.blobs / sha256[:2] / f"{sha256}{suffix}"

    def add_blob(self, user_id: int, temporary: Path, sha256: str, suffix: str) -> Path:
        """Move a received, hashed file into the blob folder (kept when the same content is
        there already) and record that ``user_id`` holds it."""
        path = self.blob_path(sha256, suffix)
        path.parent.mkdir(exist_ok=True)
        if path.exists():
            temporary.unlink(missing_ok=True)
        else:
            os.replace(temporary, path)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO uploads (user_id, sha256, suffix, size, created)"
                             " VALUES (?, ?, ?, ?, ?)",
                             (user_id, sha256, suffix, path.stat().st_size, time.time()))
        return path

    def add_file(self, user_id: int, source: Path) -> str:
        """Record a file a job produced as the user's blob (copied); returns its SHA-256."""
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            head = f.read(1 << 20)
            while head:
                digest.update(head)
                head = f.read(1 << 20)
        sha = digest.hexdigest()
        with open(source, "rb") as f:
            suffix = sniff_suffix(f.read(4096)) or "".join(source.suffixes[-2:])
        temporary = self.incoming / f"{secrets.token_hex(8)}.part"
        try:
            shutil.copyfile(source, temporary)
            self.add_blob(user_id, temporary, sha, suffix)
        finally:
            temporary.unlink(missing_ok=True)  # moved into the blobs, or a partial copy
        return sha

    def upload(self, user_id: int, sha256: str) -> Path | None:
        """The file of upload ``sha256`` when ``user_id`` holds it, else None."""
        rows = self._query("SELECT suffix FROM uploads WHERE user_id = ? AND sha256 = ?",
                           user_id, sha256)
        return self.blob_path(sha256, rows[0]["suffix"]) if rows else None

    # jobs -------------------------------------------------------------------------------------

    def add_job(self, job_id: str, user_id: int, command: str, request: dict,
                worker_job: dict) -> str:
        """Queue job ``job_id``: the client's ``request`` and the ``worker_job`` it became."""
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, user_id, command, state, request, worker_job,"
                             " created) VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                             (job_id, user_id, command, json.dumps(request),
                              json.dumps(worker_job), time.time()))
        return job_id

    def job(self, job_id: str, user_id: int | None = None) -> dict | None:
        """Job ``job_id`` (of ``user_id`` when given) as a dict, or None."""
        rows = self._query("SELECT * FROM jobs WHERE id = ?" +
                           (" AND user_id = ?" if user_id is not None else ""),
                           job_id, *([user_id] if user_id is not None else []))
        if not rows:
            return None
        job = dict(rows[0])
        job["request"] = json.loads(job["request"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        job["worker_job"] = json.loads(job["worker_job"]) if job["worker_job"] else None
        return job

    def jobs_of(self, user_id: int) -> list[dict]:
        return [self.job(row["id"]) for row in
                self._query("SELECT id FROM jobs WHERE user_id = ? ORDER BY created", user_id)]

    def claim_next(self) -> dict | None:
        """The oldest queued job, now marked running; None when the queue is empty."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' "
                                       "ORDER BY created, rowid LIMIT 1").fetchone()
                if row:
                    self._db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ?",
                                     (time.time(), row["id"]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.job(row["id"]) if row else None

    def finish(self, job_id: str, state: str, event: dict, message: str | None = None,
               result: dict | None = None) -> None:
        """End job ``job_id`` in ``state`` and add its last ``event``, together: a client that
        sees ``done`` finds the job done and its files there."""
        assert state in FINISHED
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE jobs SET state = ?, finished = ?, message = ?, result = ?"
                                 " WHERE id = ?", (state, time.time(), message,
                                                   json.dumps(result) if result else None, job_id))
                self.add_event(job_id, event)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel ``job_id`` if it is still queued (then add its ``cancelled`` event)."""
        with self._lock:
            rows = self._db.execute("SELECT 1 FROM jobs WHERE id = ? AND state = 'queued'",
                                    (job_id,)).fetchall()
            if rows:
                self.finish(job_id, "cancelled", {"event": "cancelled"}, "cancelled before it started")
            changed = bool(rows)
        return bool(changed)

    def add_event(self, job_id: str, event: dict) -> int:
        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?",
                                       (job_id,)).fetchone()
            self._db.execute("INSERT INTO events (job_id, seq, event) VALUES (?, ?, ?)",
                             (job_id, last + 1, json.dumps(event)))
        return last + 1

    def events(self, job_id: str, after: int = 0) -> list[tuple[int, dict]]:
        return [(row["seq"], json.loads(row["event"])) for row in
                self._query("SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                            job_id, after)]

    # audit log --------------------------------------------------------------------------------

    def audit(self, action: str, user: str | None, client: str | None, job_id: str | None = None,
              sha256s: list[str] | tuple[str, ...] = (), detail: str | None = None) -> None:
        """Add one row to the audit log (see the module doc)."""
        assert action in AUDIT_ACTIONS
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._db.execute("INSERT INTO audit (time, user, action, job_id, sha256s, client, detail)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (now.replace("+00:00", "Z"), user, action, job_id,
                              ",".join(sha256s) or None, client, detail))

    def audit_rows(self, user: str | None = None, job_id: str | None = None) -> list[dict]:
        """The audit log, oldest first (of ``user`` and of ``job_id`` when given)."""
        where = [clause for clause, value in (("user = ?", user), ("job_id = ?", job_id))
                 if value is not None]
        rows = self._query("SELECT time, user, action, job_id, sha256s, client, detail FROM audit"
                           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id",
                           *[v for v in (user, job_id) if v is not None])
        return [dict(row) for row in rows]

    def recover(self) -> list[str]:
        """At start: jobs left running by a server that stopped become failed, each with an
        ``error`` event; queued jobs stay queued. Returns the failed jobs' ids."""
        message = "the server stopped while this job ran; submit it again"
        ids = [row["id"] for row in self._query("SELECT id FROM jobs WHERE state = 'running'")]
        for job_id in ids:
            self.finish(job_id, "failed", {"event": "error", "message": message}, message)
        return ids
