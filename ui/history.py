"""The studio's history: every browser's sessions, kept server-side so a reload, a new tab or a restart
loses nothing.

One SQLite file (`history.sqlite3`, WAL mode) in the app's data folder, plus one folder of PNGs per
session (`images/<session id>/round_<i>.png` and `thumb.png`). Every query is keyed by the browser's id,
a random token the page keeps in the browser's storage (`ui.history_panel`): a visitor never sees
another browser's sessions.

Writes are crash-safe: each PNG is written to a temporary file and moved into place (`os.replace`); the
rows that point at it are committed afterwards, in one transaction, and the thumbnail is written after
that. A crash or an error between the two leaves an unreferenced file (overwritten by the next save of
that round), never a row without its image, nor a session listed for files without rows. On load,
rounds whose file is missing or unreadable are skipped and reported. A damaged database file is moved
aside (`history.sqlite3.damaged-<time>`) with a warning and a fresh one is made.

Two tabs of one browser that go on from the same session would both make "round 3": the store compares
each round it is given with the stored round of that number (its record, timings included) and refuses
a clash (`SessionClashError`) before writing anything; the page then keeps that tab's rounds as a new
session (`ui.history_panel`), so both tabs' work is kept.

Retention (`HistorySettings`: sessions per browser, age, total bytes) is enforced after each write, a
bounded number of deletions at a time, so it never holds a round up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from img_core.paths import cache_root
from img_core.record import NOT_RECORDED, Round

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "IMG_STUDIO_DATA"  # e.g. /data/img-studio on a Hugging Face Space with persistent storage
DATA_SUBFOLDER = "studio"  # under the cache folder (img_core.paths) when neither flag nor variable is set
DB_NAME = "history.sqlite3"
IMAGES_FOLDER = "images"
THUMB_NAME = "thumb.png"
THUMB_PX = 160  # the longest side of a History thumbnail
BUSY_TIMEOUT_SECONDS = 10.0  # another process (or store) holding the write lock
DELETIONS_PER_WRITE = 20  # retention deletes at most this many sessions after one write (bounded work)
BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(24)
SESSION_ID = re.compile(r"[0-9a-f]{16}")  # secrets.token_hex(8)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    browser TEXT NOT NULL,
    prompt TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    rounds INTEGER NOT NULL DEFAULT 0,
    base INTEGER,
    critique TEXT NOT NULL DEFAULT '',
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_browser ON sessions (browser, updated);
CREATE INDEX IF NOT EXISTS sessions_by_age ON sessions (updated);
CREATE TABLE IF NOT EXISTS rounds (
    session TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    record TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (session, idx)
);
CREATE TABLE IF NOT EXISTS browsers (
    id TEXT PRIMARY KEY,
    current TEXT
);
"""


@dataclass(frozen=True)
class HistorySettings:
    """How much history the app keeps: the newest `max_sessions` sessions of each browser, none older
    than `max_age_days`, and at most `max_total_bytes` of images over all browsers (oldest go first)."""

    max_sessions: int = 50
    max_age_days: float = 30.0
    max_total_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_age_days <= 0 or self.max_total_bytes < 1:
            raise ValueError(f"history limits must be positive, got {self}")


@dataclass(frozen=True)
class SessionSummary:
    """One line of the History panel."""

    id: str
    prompt: str
    rounds: int
    created: float
    updated: float
    thumbnail: Path | None  # None when its file is gone


@dataclass
class StoredSession:
    """A session read back: its rounds (consecutive indices, those whose image could be read), the base,
    the critique last shown for that base, and what was skipped."""

    id: str
    rounds: list[Round]
    base: int | None
    critique: str
    skipped: list[str] = field(default_factory=list)  # one message per round that could not be read


def default_data_dir() -> Path:
    """$IMG_STUDIO_DATA when set, else `<cache folder>/studio` (img_core.paths.cache_root)."""
    return Path(os.environ.get(DATA_DIR_ENV) or cache_root() / DATA_SUBFOLDER).expanduser()


def new_browser_id() -> str:
    return secrets.token_urlsafe(24)


def new_session_id() -> str:
    return secrets.token_hex(8)


def is_browser_id(value: object) -> bool:
    return isinstance(value, str) and BROWSER_ID.fullmatch(value) is not None


def is_session_id(value: object) -> bool:
    return isinstance(value, str) and SESSION_ID.fullmatch(value) is not None


class HistoryStore:
    """The sessions of every browser in one folder. Safe to use from several threads (one connection
    behind a lock) and from several processes or stores on the same folder (SQLite's locking)."""

    def __init__(self, folder: str | Path, settings: HistorySettings | None = None):
        self.folder = Path(folder).expanduser()
        self.settings = settings or HistorySettings()
        self.images = self.folder / IMAGES_FOLDER
        self.images.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DB_NAME
        self.moved_aside: Path | None = None  # where a damaged database went
        self._lock = threading.Lock()
        self._db = self._open()

    # --- opening ----------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as error:
            self.moved_aside = self._move_aside(error)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            db.execute("PRAGMA foreign_keys=ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self, error: Exception) -> Path:
        aside = self.path.with_name(f"{DB_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                os.replace(source, f"{aside}{suffix}")
        logger.warning("the history database %s was damaged (%s): moved it to %s and started a fresh one",
                       self.path, error, aside)  # fmt: skip
        return aside

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the store's lock; BEGIN IMMEDIATE takes the write lock at once (waits up
        to BUSY_TIMEOUT_SECONDS for another process)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # SQLite itself rolls back on some errors (SQLITE_FULL, SQLITE_IOERR)
                    self._db.execute("ROLLBACK")  # a second ROLLBACK would raise, hiding the error that happened
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    # --- writing ----------------------------------------------------------------------------------

    def save(
        self,
        browser: str,
        session_id: str,
        rounds: list[Round],
        base: int | None,
        png_file: Callable[[Image.Image], str | Path] | None = None,
    ) -> int:
        """Store the rounds of `session_id` not stored yet (their PNGs first, then the rows in one
        transaction, then the thumbnail), its base, and make it the browser's current session.
        `png_file(image)` may give the PNG the page already wrote for an image (copied instead of encoded
        again). Returns how many rounds were written; then applies the retention limits (bounded work)."""
        _check_ids(browser, session_id)
        if not rounds:
            return 0
        records = {item.index: _round_json(item) for item in rounds}
        stored = self._stored_records(session_id)
        owner = self._query("SELECT browser FROM sessions WHERE id = ?", (session_id,))
        if owner and owner[0][0] != browser:
            raise PermissionError("this session belongs to another browser")
        _check_no_clash(session_id, records, stored)  # before any PNG is written: another tab's files stay
        new = [item for item in rounds if item.index not in stored]
        folder = self.images / session_id
        folder.mkdir(exist_ok=True)
        written = []
        for item in new:
            target = folder / f"round_{item.index}.png"
            source = png_file(item.image) if png_file is not None else None
            _write_atomically(target, item.image, source)
            written.append((item, target.stat().st_size))
        newest = max(rounds, key=lambda item: item.index)
        now = time.time()
        with self._transaction() as db:
            # again under the write lock: another process may have stored rounds since the check above
            _check_no_clash(session_id, records, dict(db.execute(
                "SELECT idx, record FROM rounds WHERE session = ?", (session_id,)).fetchall()))
            db.execute(
                "INSERT INTO sessions (id, browser, prompt, created, updated, base) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, base = excluded.base, "
                "critique = CASE WHEN ? THEN '' ELSE critique END",
                (session_id, browser, rounds[0].prompt, now, now, base, bool(written)),
            )
            db.executemany(
                "INSERT OR IGNORE INTO rounds (session, idx, record, bytes) VALUES (?, ?, ?, ?)",
                [(session_id, item.index, records[item.index], size) for item, size in written],
            )
            db.execute(
                "UPDATE sessions SET rounds = (SELECT COUNT(*) FROM rounds WHERE session = :id), "
                "bytes = (SELECT COALESCE(SUM(bytes), 0) FROM rounds WHERE session = :id) WHERE id = :id",
                {"id": session_id},  # named: a sequence for numbered ?1 is deprecated (an error from Python 3.14)
            )
            _set_current(db, browser, session_id)
        if newest.index not in stored:  # after the commit: a failed save never shows a round it did not store
            try:
                _write_atomically(folder / THUMB_NAME, _thumbnail(newest.image), durable=False)
            except OSError as error:  # the rounds are stored; the newest round's image stands in
                logger.warning("history session %s: its thumbnail could not be written (%s)", session_id, error)
        self.enforce_retention(browser, keep=session_id)
        return len(written)

    def _stored_records(self, session_id: str) -> dict[int, str]:
        return dict(self._query("SELECT idx, record FROM rounds WHERE session = ?", (session_id,)))

    def set_view(self, browser: str, session_id: str, base: int | None, critique: str = "") -> None:
        """Remember the base and the critique box of a session (restored with it)."""
        _check_ids(browser, session_id)
        with self._transaction() as db:
            db.execute("UPDATE sessions SET base = ?, critique = ? WHERE id = ? AND browser = ?",
                       (base, critique or "", session_id, browser))  # fmt: skip

    def set_current(self, browser: str, session_id: str | None) -> None:
        """The session a reload of this browser restores (None: an empty page, as after Reset)."""
        _check_ids(browser, session_id)
        with self._transaction() as db:
            _set_current(db, browser, session_id)

    def current(self, browser: str) -> str | None:
        _check_ids(browser)
        found = self._query(
            "SELECT b.current FROM browsers b JOIN sessions s ON s.id = b.current AND s.browser = b.id "
            "WHERE b.id = ?",
            (browser,),
        )
        return found[0][0] if found else None

    def delete(self, browser: str, session_id: str) -> bool:
        """Delete one session of this browser (rows, then files); False when it has no such session."""
        _check_ids(browser, session_id)
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM sessions WHERE id = ? AND browser = ?", (session_id, browser)).rowcount
            db.execute("UPDATE browsers SET current = NULL WHERE id = ? AND current = ?", (browser, session_id))
        if deleted:
            shutil.rmtree(self.images / session_id, ignore_errors=True)
        return bool(deleted)

    def enforce_retention(self, browser: str | None = None, keep: str | None = None) -> list[str]:
        """Delete what the limits no longer allow, oldest first, at most DELETIONS_PER_WRITE sessions:
        this browser's sessions beyond `max_sessions`, sessions older than `max_age_days`, and the
        oldest sessions while all images together exceed `max_total_bytes`. `keep` is never deleted (the
        session being written). Returns the deleted session ids."""
        limits = self.settings
        keep = keep or ""
        doomed: list[str] = []
        if browser is not None:
            doomed += [row[0] for row in self._query(
                "SELECT id FROM sessions WHERE browser = ? AND id != ? ORDER BY updated DESC LIMIT -1 OFFSET ?",
                (browser, keep, limits.max_sessions - 1),
            )][:DELETIONS_PER_WRITE]  # fmt: skip
        cutoff = time.time() - limits.max_age_days * 86400
        doomed += [row[0] for row in self._query(
            "SELECT id FROM sessions WHERE updated < ? AND id != ? ORDER BY updated LIMIT ?",
            (cutoff, keep, DELETIONS_PER_WRITE),
        )]  # fmt: skip
        total = self._query("SELECT COALESCE(SUM(bytes), 0) FROM sessions")[0][0]
        if total > limits.max_total_bytes:
            for session_id, size in self._query(
                "SELECT id, bytes FROM sessions WHERE id != ? ORDER BY updated LIMIT ?", (keep, DELETIONS_PER_WRITE)
            ):
                if total <= limits.max_total_bytes:
                    break
                if session_id not in doomed:
                    doomed.append(session_id)
                    total -= size
        doomed = list(dict.fromkeys(doomed))[:DELETIONS_PER_WRITE]
        if not doomed:
            return []
        with self._transaction() as db:
            db.executemany("DELETE FROM sessions WHERE id = ?", [(session_id,) for session_id in doomed])
            db.executemany("UPDATE browsers SET current = NULL WHERE current = ?", [(s,) for s in doomed])
        for session_id in doomed:
            shutil.rmtree(self.images / session_id, ignore_errors=True)
        logger.info("history retention removed %d session(s)", len(doomed))
        return doomed

    # --- reading ----------------------------------------------------------------------------------

    def sessions(self, browser: str) -> list[SessionSummary]:
        """This browser's sessions, the most recently changed first."""
        _check_ids(browser)
        rows = self._query(
            "SELECT id, prompt, rounds, created, updated FROM sessions WHERE browser = ? ORDER BY updated DESC",
            (browser,),
        )
        summaries = []
        for session_id, prompt, rounds, created, updated in rows:
            summaries.append(SessionSummary(session_id, prompt, rounds, created, updated, self._thumbnail(session_id)))
        return summaries

    def _thumbnail(self, session_id: str) -> Path | None:
        """The session's thumbnail; if it is gone, its newest round's image; None when no image is left."""
        folder = self.images / session_id
        thumb = folder / THUMB_NAME
        if thumb.is_file() and thumb.stat().st_size > 0:
            return thumb
        rounds = sorted(folder.glob("round_*.png"), key=lambda path: int(path.stem.partition("_")[2] or 0))
        return rounds[-1] if rounds else None

    def load(self, browser: str, session_id: str) -> StoredSession | None:
        """One session of this browser with its images, or None when it has no such session. Rounds whose
        image is missing or unreadable are skipped (listed in `skipped`, and logged); the others are
        numbered 0, 1, ... again, with each round's base pointing at its new number (or None when the
        base was skipped)."""
        _check_ids(browser, session_id)
        found = self._query("SELECT base, critique FROM sessions WHERE id = ? AND browser = ?", (session_id, browser))
        if not found:
            return None
        base, critique = found[0]
        rows = self._query("SELECT idx, record FROM rounds WHERE session = ? ORDER BY idx", (session_id,))
        kept: list[Round] = []
        skipped: list[str] = []
        renumbered: dict[int, int] = {}
        for index, record in rows:
            try:
                item = _round_from_json(record, self.images / session_id / f"round_{index}.png")
            except (OSError, ValueError, TypeError, KeyError) as error:
                skipped.append(f"round {index}: its image could not be read ({type(error).__name__})")
                continue
            renumbered[index] = len(kept)
            item.index = renumbered[index]
            item.base_index = renumbered.get(item.base_index) if item.base_index is not None else None
            kept.append(item)
        if skipped:
            logger.warning("history session %s: skipped %s", session_id, "; ".join(skipped))
        new_base = renumbered.get(base) if base is not None else None
        if new_base is None and kept:
            new_base = len(kept) - 1
            critique = ""  # it belonged to another base
        return StoredSession(session_id, kept, new_base, critique if not skipped else "", skipped)


# --- helpers ----------------------------------------------------------------------------------------


class SessionClashError(RuntimeError):
    """Rounds with these numbers are stored for the session with other content: another tab of the same
    browser went on from the same session. Nothing was written; store this tab's rounds as a new session."""

    def __init__(self, session_id: str, indices: list[int]):
        super().__init__(f"session {session_id} holds other rounds numbered {indices}")
        self.indices = indices


def _check_no_clash(session_id: str, records: dict[int, str], stored: dict[int, str]) -> None:
    clashing = sorted(index for index, record in records.items() if index in stored and stored[index] != record)
    if clashing:
        raise SessionClashError(session_id, clashing)


def _check_ids(browser: str, session_id: str | None = None) -> None:
    if not is_browser_id(browser):
        raise ValueError("not a browser id")
    if session_id is not None and not is_session_id(session_id):
        raise ValueError("not a session id")


def _set_current(db: sqlite3.Connection, browser: str, session_id: str | None) -> None:
    db.execute("INSERT INTO browsers (id, current) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET current = ?",
               (browser, session_id, session_id))  # fmt: skip


def _write_atomically(target: Path, image: Image.Image, source: str | Path | None = None, durable: bool = True) -> None:
    """`image` as PNG at `target` (a copy of `source` when given): written beside it, then moved into place.
    `durable`: on disk (fsync) before the move, so a power cut cannot leave a row pointing at an empty file;
    a thumbnail (written again with the next round; the newest round's image stands in while it is
    missing) need not wait for that."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            if source is not None:
                with open(source, "rb") as original:
                    shutil.copyfileobj(original, file)
            else:
                image.save(file, format="PNG")
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _thumbnail(image: Image.Image) -> Image.Image:
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.NEAREST if max(image.size) <= THUMB_PX else Image.LANCZOS)
    return thumb


def _round_json(item: Round) -> str:
    values = item.to_dict()
    values.pop("image_file", None)
    return json.dumps(values)


def _round_from_json(record: str, image_path: Path) -> Round:
    values = json.loads(record)
    allowed = set(Round.__dataclass_fields__) - set(NOT_RECORDED)
    with Image.open(image_path) as opened:
        opened.load()
        image = opened.copy()
    return Round(image=image, **{name: value for name, value in values.items() if name in allowed})


# --- the app's flags -------------------------------------------------------------------------------------


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --no-history and the retention limits (defaults: `HistorySettings`)."""
    defaults = HistorySettings()
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"folder for the History of every browser's sessions (default ${DATA_DIR_ENV}, else "
                        f"<cache folder>/{DATA_SUBFOLDER}; on a Space with persistent storage set {DATA_DIR_ENV} "
                        "to a folder under /data)")  # fmt: skip
    parser.add_argument("--no-history", action="store_true", help="keep no History: a reload loses the rounds")
    parser.add_argument("--history-sessions", type=_positive(int), default=defaults.max_sessions,
                        help=f"sessions kept per browser (default {defaults.max_sessions})")  # fmt: skip
    parser.add_argument("--history-days", type=_positive(float), default=defaults.max_age_days,
                        help=f"sessions older than this many days are deleted (default {defaults.max_age_days:g})")
    parser.add_argument("--history-gb", type=_positive(float), default=defaults.max_total_bytes / 1024**3,
                        help=f"images of all browsers together (default {defaults.max_total_bytes / 1024**3:g} GB)")


def history_from_args(args: argparse.Namespace) -> HistoryStore | None:
    """The store the flags ask for; None with --no-history or when its folder cannot be used (a warning
    says why; the app runs without a History)."""
    if args.no_history:
        return None
    folder = args.data_dir or default_data_dir()
    settings = HistorySettings(args.history_sessions, args.history_days, int(args.history_gb * 1024**3))
    try:
        return HistoryStore(folder, settings)
    except (OSError, sqlite3.Error) as error:
        logger.warning("no History: the data folder %s cannot be used (%s)", folder, error)
        return None


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse
