"""The history store (ui.history) on real files in tmp_path: write and restore, delete, isolation by browser
id, retention, a missing image, a damaged database, and two threads writing at once."""

import os
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image

from img_core.record import Round
from ui.history import (
    DB_NAME,
    HistorySettings,
    HistoryStore,
    SessionClashError,
    new_browser_id,
    new_session_id,
)


def make_round(index: int, base_index: int | None = None, colour: int = 0, size: int = 64) -> Round:
    pixels = np.full((size, size, 3), (colour * 37 + index * 11) % 256, dtype=np.uint8)
    pixels[0, 0] = (index, colour, 7)
    return Round(
        index=index,
        image=Image.fromarray(pixels),
        prompt="A green banana and a brown horse.",
        seed=3,
        source="generated" if index == 0 else "refined",
        critique=None if index == 0 else f"critique {index}",
        guidance_mode=None if index == 0 else "question",
        question=None if index == 0 else "Is the horse brown?",
        base_index=base_index,
        settings={"steps": 4, "guidance_scale": 5.0},
        seconds={"generate": 0.5 + index},
        scores={"vqascore": 0.25 + index / 100},
    )


def chain(length: int, colour: int = 0) -> list[Round]:
    return [make_round(i, None if i == 0 else i - 1, colour) for i in range(length)]


@pytest.fixture
def store(tmp_path):
    history = HistoryStore(tmp_path / "data")
    yield history
    history.close()


def test_written_rounds_come_back_exactly(store):
    browser, session = new_browser_id(), new_session_id()
    rounds = chain(3)
    assert store.save(browser, session, rounds[:1], base=0) == 1
    assert store.save(browser, session, rounds, base=2) == 2  # only the new ones are written
    store.set_view(browser, session, base=1, critique="Make the horse brown.")
    assert store.current(browser) == session
    back = store.load(browser, session)
    assert [r.index for r in back.rounds] == [0, 1, 2]
    assert [r.base_index for r in back.rounds] == [None, 0, 1]
    assert back.base == 1 and back.critique == "Make the horse brown." and back.skipped == []
    for original, restored in zip(rounds, back.rounds):
        assert np.array_equal(np.asarray(original.image), np.asarray(restored.image))
        assert restored.to_dict() == original.to_dict()
    (summary,) = store.sessions(browser)
    assert (summary.id, summary.rounds, summary.prompt) == (session, 3, rounds[0].prompt)
    assert summary.thumbnail is not None and Image.open(summary.thumbnail).size == (64, 64)
    assert not list((store.images / session).glob("*.tmp"))  # no temporary file left behind


def test_two_tabs_going_on_from_one_session_never_overwrite_each_other(store):
    browser, session = new_browser_id(), new_session_id()
    store.save(browser, session, chain(2), base=1)
    restored = store.load(browser, session).rounds  # the second tab: the same session, from the store
    assert store.save(browser, session, restored, base=1) == 0  # a restored round is the stored one: no clash
    first_tab = [*chain(2), make_round(2, base_index=1, colour=1)]
    second_tab = [*restored, make_round(2, base_index=0, colour=2)]
    assert store.save(browser, session, first_tab, base=2) == 1
    stored_png = (store.images / session / "round_2.png").read_bytes()
    with pytest.raises(SessionClashError) as clash:
        store.save(browser, session, second_tab, base=2)
    assert clash.value.indices == [2]
    assert (store.images / session / "round_2.png").read_bytes() == stored_png  # nothing written
    back = store.load(browser, session).rounds
    assert [r.base_index for r in back] == [None, 0, 1] and np.array_equal(np.asarray(back[2].image),
                                                                           np.asarray(first_tab[2].image))
    fork = new_session_id()  # what the page does (ui.history_panel): the second tab's rounds as a new session
    assert store.save(browser, fork, second_tab, base=2) == 3
    assert [r.base_index for r in store.load(browser, fork).rounds] == [None, 0, 0]
    assert {summary.id for summary in store.sessions(browser)} == {session, fork}


def test_a_new_round_clears_the_stored_critique(store):
    browser, session = new_browser_id(), new_session_id()
    store.save(browser, session, chain(1), base=0)
    store.set_view(browser, session, base=0, critique="old critique of round 0")
    store.save(browser, session, chain(2), base=1)
    assert store.load(browser, session).critique == ""


def test_delete_removes_rows_and_files(store):
    browser, first, second = new_browser_id(), new_session_id(), new_session_id()
    store.save(browser, first, chain(2), base=1)
    store.save(browser, second, chain(1, colour=1), base=0)
    assert store.current(browser) == second
    assert store.delete(browser, second)
    assert not (store.images / second).exists()
    assert [s.id for s in store.sessions(browser)] == [first]
    assert store.current(browser) is None  # a reload shows an empty page, not a deleted session
    assert not store.delete(browser, second)


def test_browsers_never_see_each_others_sessions(store):
    alice, bob = new_browser_id(), new_browser_id()
    session = new_session_id()
    store.save(alice, session, chain(2), base=1)
    assert store.sessions(bob) == []
    assert store.load(bob, session) is None
    assert store.current(bob) is None
    assert not store.delete(bob, session)
    with pytest.raises(PermissionError):
        store.save(bob, session, chain(3), base=2)  # cannot write into it either
    assert len(store.load(alice, session).rounds) == 2
    for forged in ("", "../../etc", "x" * 31, None, 12):
        with pytest.raises(ValueError):
            store.sessions(forged)


def test_retention_keeps_the_newest_sessions_of_a_browser(tmp_path):
    store = HistoryStore(tmp_path, HistorySettings(max_sessions=3))
    browser, other = new_browser_id(), new_browser_id()
    store.save(other, new_session_id(), chain(1), base=0)
    made = []
    for colour in range(5):
        made.append(new_session_id())
        store.save(browser, made[-1], chain(1, colour), base=0)
    assert [s.id for s in store.sessions(browser)] == made[:-4:-1]
    assert len(store.sessions(other)) == 1  # another browser's count is its own
    assert sorted(p.name for p in store.images.iterdir()) == sorted([*made[2:], store.sessions(other)[0].id])


def test_retention_by_age_and_by_bytes(tmp_path):
    store = HistoryStore(tmp_path)
    browser = new_browser_id()
    old, recent = new_session_id(), new_session_id()
    store.save(browser, old, chain(1), base=0)
    store.save(browser, recent, chain(1, 1), base=0)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (time.time() - 40 * 86400, old))
    assert store.enforce_retention() == [old]
    assert [s.id for s in store.sessions(browser)] == [recent]
    store.close()

    one_session = HistoryStore(tmp_path).sessions(browser)[0]
    size = sum(p.stat().st_size for p in (tmp_path / "images" / one_session.id).glob("round_*.png"))
    small = HistoryStore(tmp_path, HistorySettings(max_total_bytes=int(size * 2.5)))
    made = [new_session_id() for _ in range(3)]
    for colour, session in enumerate(made):
        small.save(browser, session, chain(1, colour + 2), base=0)
    kept = [s.id for s in small.sessions(browser)]
    assert kept == [made[2], made[1]]  # 4 sessions would exceed 2.5 sessions' bytes: the oldest went
    total = sum(p.stat().st_size for p in small.images.rglob("round_*.png"))
    assert total <= size * 2.5


def test_rounds_whose_image_is_missing_are_skipped_and_reported(store):
    browser, session = new_browser_id(), new_session_id()
    rounds = chain(4)
    store.save(browser, session, rounds, base=3)
    (store.images / session / "round_1.png").unlink()
    (store.images / session / "round_2.png").write_bytes(b"not a png")
    back = store.load(browser, session)
    assert [r.index for r in back.rounds] == [0, 1]  # rounds 0 and 3, numbered again
    assert [r.base_index for r in back.rounds] == [None, None]  # round 3's base (2) was skipped
    assert np.array_equal(np.asarray(back.rounds[1].image), np.asarray(rounds[3].image))
    assert back.base == 1
    assert len(back.skipped) == 2 and "round 1" in back.skipped[0] and "round 2" in back.skipped[1]
    (store.images / session / "thumb.png").unlink()  # the History shows the newest round's image instead
    assert store.sessions(browser)[0].thumbnail == store.images / session / "round_3.png"


def test_a_damaged_database_is_moved_aside(tmp_path, caplog):
    folder = tmp_path / "data"
    store = HistoryStore(folder)
    browser = new_browser_id()
    store.save(browser, new_session_id(), chain(1), base=0)
    store.close()
    for suffix in ("-wal", "-shm"):
        (folder / f"{DB_NAME}{suffix}").unlink(missing_ok=True)
    (folder / DB_NAME).write_bytes(b"this is not an SQLite database" * 200)
    fresh = HistoryStore(folder)
    assert fresh.moved_aside is not None and fresh.moved_aside.read_bytes().startswith(b"this is not")
    assert "damaged" in caplog.text
    assert fresh.sessions(browser) == []
    session = new_session_id()
    fresh.save(browser, session, chain(2), base=1)  # and it works
    assert len(fresh.load(browser, session).rounds) == 2


def test_a_failure_before_the_pngs_writes_nothing(store, monkeypatch):
    """A failure while the rounds' records are made (before any PNG or row is written) leaves the stored
    session as it was, and the next write completes it."""
    browser, session = new_browser_id(), new_session_id()
    store.save(browser, session, chain(1), base=0)

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("ui.history._round_json", crash)
    with pytest.raises(OSError):
        store.save(browser, session, chain(2), base=1)
    monkeypatch.undo()
    assert not (store.images / session / "round_1.png").exists()
    back = store.load(browser, session)
    assert len(back.rounds) == 1 and back.skipped == []
    assert store.save(browser, session, chain(2), base=1) == 1  # the next write completes it


def corner(path) -> tuple:
    """The pixel make_round marks with (index, colour, 7): which round an image (or thumbnail) shows."""
    with Image.open(path) as image:
        return image.convert("RGB").getpixel((0, 0))


# ABORT undoes the failing statement (SQLite's constraint errors); ROLLBACK undoes the whole transaction
# before the store's own ROLLBACK runs (as SQLite does itself on SQLITE_FULL or SQLITE_IOERR).
@pytest.mark.parametrize("undo", ["ABORT", "ROLLBACK"])
def test_a_failure_inside_the_transaction_leaves_no_half_session(store, undo):
    """The PNGs are written, then the rows' transaction fails at the rounds' INSERT, after the session's
    own row was written in it: the error is the one that happened; nothing of the failed save is visible
    (no session without rounds, no round without its PNG, no listed session or thumbnail for PNGs without
    rows); listing, restoring and the store itself go on working; the next save completes the session."""
    browser, kept, new = new_browser_id(), new_session_id(), new_session_id()
    assert store.save(browser, kept, chain(1), base=0) == 1
    store._db.execute(
        f"CREATE TEMP TRIGGER injected BEFORE INSERT ON rounds BEGIN SELECT RAISE({undo}, 'disk full (injected)'); END"
    )
    with pytest.raises(sqlite3.DatabaseError, match=r"disk full \(injected\)"):
        store.save(browser, kept, chain(2), base=1)  # a round added to a stored session
    with pytest.raises(sqlite3.DatabaseError, match=r"disk full \(injected\)"):
        store.save(browser, new, chain(2, colour=1), base=1)  # a new session
    # the PNGs were in place before the transaction failed
    assert (store.images / kept / "round_1.png").is_file() and (store.images / new / "round_1.png").is_file()
    assert not store._db.in_transaction  # the store's connection is free for the next write

    def check_nothing_half_done(store: HistoryStore) -> None:
        (summary,) = store.sessions(browser)  # the new session is not listed (its row was rolled back)
        assert (summary.id, summary.rounds, summary.prompt) == (kept, 1, chain(1)[0].prompt)
        assert corner(summary.thumbnail) == (0, 0, 7), "the thumbnail shows round 0, the session's one round"
        assert store._query("SELECT COUNT(*) FROM sessions WHERE id = ?", (new,)) == [(0,)]
        assert store.load(browser, new) is None and store.current(browser) == kept
        back = store.load(browser, kept)
        assert [r.index for r in back.rounds] == [0] and back.skipped == [] and back.base == 0
        assert np.array_equal(np.asarray(back.rounds[0].image), np.asarray(chain(1)[0].image))
        for session, index in store._query("SELECT session, idx FROM rounds"):  # every row has its PNG
            assert (store.images / session / f"round_{index}.png").is_file()

    check_nothing_half_done(store)
    restarted = HistoryStore(store.folder)  # as a restarted app (a new connection) sees it
    try:
        check_nothing_half_done(restarted)
    finally:
        restarted.close()
    store._db.execute("DROP TRIGGER injected")
    store.set_view(browser, kept, base=0, critique="still writable")
    assert store.load(browser, kept).critique == "still writable"

    assert store.save(browser, kept, chain(2), base=1) == 1  # the next writes complete both sessions
    assert store.save(browser, new, chain(2, colour=1), base=1) == 2
    for session, colour in ((kept, 0), (new, 1)):
        back = store.load(browser, session)
        assert [r.base_index for r in back.rounds] == [None, 0] and back.skipped == []
        for original, restored in zip(chain(2, colour), back.rounds):
            assert np.array_equal(np.asarray(original.image), np.asarray(restored.image))
    summaries = {summary.id: summary for summary in store.sessions(browser)}
    assert {session: summary.rounds for session, summary in summaries.items()} == {kept: 2, new: 2}
    assert corner(summaries[kept].thumbnail) == (1, 0, 7) and corner(summaries[new].thumbnail) == (1, 1, 7)


def test_two_threads_write_at_once(tmp_path):
    """Two stores on one folder (as two processes would) and two threads on one store."""
    first, second = HistoryStore(tmp_path), HistoryStore(tmp_path)
    browsers = [new_browser_id() for _ in range(4)]
    errors = []

    def write(store, browser):
        try:
            for colour in range(6):
                session = new_session_id()
                for length in (1, 2, 3):
                    store.save(browser, session, chain(length, colour), base=length - 1)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(store, browser))
               for store, browser in zip([first, second, first, second], browsers)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for browser in browsers:
        summaries = first.sessions(browser)
        assert len(summaries) == 6 and {s.rounds for s in summaries} == {3}
        for summary in summaries:
            assert len(second.load(browser, summary.id).rounds) == 3
    assert os.path.exists(f"{first.path}-wal")  # WAL mode
