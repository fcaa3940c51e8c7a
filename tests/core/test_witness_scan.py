"""The periodic check's forward scan of the witness file (core.witness_scan): the largest checkpoint
it has held, kept beside it, and a log rewound and sealed again, caught whatever place the check
resumes from. Histories here are lists of leaves; ``extends`` is what the stored tree proves."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core import checkpoint, merkle, witness, witness_scan
from core.checkpoint import Checkpoint

KEYS = checkpoint.generate("dermq.test/audit")
FIRST = [merkle.leaf_hash(b"first %d" % i) for i in range(200)]
REWOUND = FIRST[:40] + [merkle.leaf_hash(b"rewound %d" % i) for i in range(160)]  # parts from 40 on


def root(leaves: list[bytes], size: int) -> bytes:
    tree = merkle.CompactRange()
    for leaf in leaves[:size]:
        tree.append(leaf)
    return tree.root()


def note(size: int, history: list[bytes] = FIRST) -> str:
    return Checkpoint("dermq.test/audit", size, root(history, size), datetime.now(UTC)).sign(KEYS.signer)


def stored_tree_is(history: list[bytes], size: int = 200) -> witness_scan.RootAt:
    """The stored tree's roots when it holds the first ``size`` leaves of ``history``."""
    return lambda at: root(history, at) if at <= size else None


def scan(path: Path, history: list[bytes] = FIRST, size: int = 200) -> witness_scan.Scanned:
    return witness_scan.scan(path, KEYS.verifiers, stored_tree_is(history, size))


def test_the_largest_checkpoint_is_kept_and_notes_a_sealer_appended_late_are_no_problem(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    for size in (1, 2, 5, 3, 4, 6):  # two sealers finished out of order
        witness.append(path, note(size))
    first = scan(path)
    assert first.problem is None and first.highest is not None and first.highest.size == 6
    for size in (7, 9, 8):
        witness.append(path, note(size))
    later = scan(path)
    assert later.problem is None and later.highest is not None and later.highest.size == 9


@pytest.mark.parametrize("resealed_to", [41, 60, 150])  # short of the old history's end, and past it
def test_a_rewound_log_sealed_again_is_caught_and_stays_caught(tmp_path: Path, resealed_to: int) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 101):
        witness.append(path, note(size))
    assert scan(path).problem is None
    for size in range(41, resealed_to + 1, 10):  # a new history from 40 on, sealed by the real key
        witness.append(path, note(size, REWOUND))
    caught = scan(path, REWOUND, resealed_to)  # the stored tree now holds the new history
    assert caught.problem is not None and "rewound" in caught.problem
    assert caught.highest is not None and caught.highest.size == 100  # the old history's, kept
    assert scan(path, REWOUND, resealed_to).problem == caught.problem  # every later check fails with it
    os.remove(witness_scan.state_path(path))  # an operator has looked, and starts afresh
    assert scan(path, REWOUND, resealed_to).problem is not None  # this file still shows both histories


def test_a_renamed_file_is_read_from_its_start_and_the_largest_checkpoint_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 11):
        witness.append(path, note(size))
    assert scan(path).highest is not None
    os.replace(path, tmp_path / "witness.log.1")  # rotated by renaming, as logrotate does
    assert scan(path).highest.size == 10  # type: ignore[union-attr]  # no file yet: the largest stays
    for size in (11, 12):
        witness.append(path, note(size))
    assert scan(path).highest.size == 12  # type: ignore[union-attr]  # the new file, from its start
    caught = scan(path, FIRST, size=5)  # the database restored from a backup of 5 events, say
    assert caught.problem is not None and "fewer than the 12 events" in caught.problem


def test_a_long_file_is_read_over_several_checks_and_a_note_cut_by_a_read_is_read_whole_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 201):
        witness.append(path, note(size))
    monkeypatch.setattr(witness_scan, "SCAN_BYTES", 5000)  # about 23 notes a check, a note cut at each end
    seen = []
    while True:
        scanned = scan(path)
        assert scanned.problem is None and scanned.highest is not None
        seen.append(scanned.highest.size)
        if scanned.highest.size == 200:
            break
    assert seen == sorted(seen) and 5 < len(seen) < 12


def test_what_a_renamed_file_got_after_the_last_scan_is_read_before_the_new_file(tmp_path: Path) -> None:
    # The insider rewinds just after a rotation, to a place past the last scan's largest checkpoint:
    # only the old file's unread end still holds the history that was dropped.
    path, other = tmp_path / "witness.log", FIRST[:45] + [merkle.leaf_hash(b"other %d" % i) for i in range(155)]
    for size in range(1, 11):
        witness.append(path, note(size))
    assert scan(path, other).problem is None  # 1..10: the same in both histories
    for size in range(11, 61):
        witness.append(path, note(size))  # not read by any check yet
    os.replace(path, tmp_path / "witness.log.1")
    for size in (50, 55):
        witness.append(path, note(size, other))
    caught = scan(path, other, size=55)
    assert caught.problem is not None and "not those of the witness file's checkpoint" in caught.problem


def test_a_renamed_file_gone_before_a_scan_read_it_to_its_end_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    witness.append(path, note(1))
    assert scan(path).problem is None
    witness.append(path, note(2))
    os.replace(path, tmp_path / "witness.log.1")
    os.remove(tmp_path / "witness.log.1")  # compressed (or deleted) at once
    witness.append(path, note(3))
    gone = scan(path)
    assert gone.problem is not None and "delaycompress" in gone.problem


def test_a_largest_checkpoint_signed_with_a_newer_key_is_left_as_it_is_until_the_key_is_read(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    newer = checkpoint.generate("dermq.test/audit")
    witness.append(path, note(1))
    witness.append(path, Checkpoint("dermq.test/audit", 2, root(FIRST, 2), datetime.now(UTC)).sign(newer.signer))
    both = [*KEYS.verifiers, *newer.verifiers]
    assert witness_scan.scan(path, both, stored_tree_is(FIRST)).highest.size == 2  # type: ignore[union-attr]
    stale = witness_scan.scan(path, KEYS.verifiers, stored_tree_is(FIRST))  # a child started before rotation
    assert stale.unverified and stale.problem is None
    assert witness_scan.scan(path, both, stored_tree_is(FIRST)).highest.size == 2  # type: ignore[union-attr]


def test_an_honest_rotation_reads_the_old_file_to_its_end_then_the_new_one_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 6):
        witness.append(path, note(size))
    assert scan(path).highest.size == 5  # type: ignore[union-attr]
    witness.append(path, note(6))
    os.replace(path, tmp_path / "witness.log.1")  # logrotate: rename, then create
    path.touch()
    assert scan(path).highest.size == 6  # type: ignore[union-attr]  # the old file's last note
    assert scan(path).highest.size == 6  # type: ignore[union-attr]  # the new one, empty so far
    witness.append(path, note(7))
    witness.append(path, note(8))
    later = scan(path)
    assert later.problem is None and later.highest.size == 8  # type: ignore[union-attr]


def test_a_torn_note_at_the_end_of_a_renamed_file_does_not_hold_the_scan_there(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    witness.append(path, note(1))
    assert scan(path).problem is None
    with path.open("ab") as file:  # a sealer that crashed in the middle of an append
        file.write(note(2).encode()[:60])
    os.replace(path, tmp_path / "witness.log.1")
    witness.append(path, note(3))
    scan(path)  # the old file's torn end
    assert scan(path).highest.size == 3  # type: ignore[union-attr]  # then the new file


def test_a_file_whose_device_number_changed_is_read_on_from_where_the_scan_left_it(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 4):
        witness.append(path, note(size))
    assert scan(path).problem is None
    state = json.loads(witness_scan.state_path(path).read_text())
    state["file"][0] += 1  # a reboot numbered the volume's device anew
    witness_scan.state_path(path).write_text(json.dumps(state))
    witness.append(path, note(4))
    moved = scan(path)
    assert moved.problem is None and moved.highest.size == 4  # type: ignore[union-attr]


def test_a_problem_found_stays_whatever_keys_a_later_check_holds(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 11):
        witness.append(path, note(size))
    assert scan(path, FIRST, size=5).problem is not None  # the database holds fewer
    stranger = checkpoint.generate("dermq.test/audit")  # a process that holds another key only
    again = witness_scan.scan(path, stranger.verifiers, stored_tree_is(FIRST))
    assert again.problem is not None and not again.unverified
