"""The witness file read from its end: the periodic check reads the notes of the trees it has not
verified yet, however long the file has grown, and finds every one of them."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core import checkpoint, merkle, witness
from core.checkpoint import Checkpoint

KEYS = checkpoint.generate("dermq.test/audit")


def note(size: int) -> str:
    return Checkpoint("dermq.test/audit", size, merkle.leaf_hash(size.to_bytes(8, "big")), datetime.now(UTC)).sign(
        KEYS.signer
    )


@pytest.fixture(scope="module")
def long_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two days of a sealer at a note a second would be 170,000 notes; 3,000 make the point."""
    path = tmp_path_factory.mktemp("witness") / "witness.log"
    path.write_text("".join(note(size) + "\n" for size in range(1, 3001)))
    return path


def sizes(notes: list[str]) -> list[int]:
    """The trees the notes sign, in their order; a note that does not verify counts for none (as in
    the check: core.audit_verify.trusted_roots)."""
    found = []
    for each in notes:
        try:
            found.append(checkpoint.parse(each, KEYS.verifiers).size)
        except checkpoint.CheckpointError:
            continue
    return found


@pytest.mark.parametrize("since", [2990, 2500, 1, 3001])
def test_a_tail_read_returns_every_note_of_a_tree_at_least_as_large_as_asked(long_file: Path, since: int) -> None:
    read = sizes(list(witness.notes(long_file, since)))
    assert [s for s in read if s >= since] == list(range(since, 3001))
    assert read == sorted(read) and read[-1] == 3000  # whole notes, none cut at the read's start


def test_a_tail_read_of_recent_trees_reads_a_small_part_of_a_long_file(long_file: Path) -> None:
    assert len(list(witness.notes(long_file, 0))) == 3000  # from scratch: all of it
    assert len(list(witness.notes(long_file, 2990))) < 500  # the last block, not 3,000 notes


def test_notes_appended_a_few_out_of_order_are_all_found(tmp_path: Path) -> None:
    # a worker's two children seal at once and append in the order they finish
    path = tmp_path / "witness.log"
    order = [*range(1, 2000), 2003, 2000, 2001, 2002, 2005, 2004, *range(2006, 2010)]
    for size in order:
        witness.append(path, note(size))
    for since in (2004, 2000):  # (the highest checkpoint, 2009, comes last again)
        assert sorted({s for s in sizes(list(witness.notes(path, since))) if s >= since}) == list(range(since, 2010))


def test_a_torn_note_and_stray_bytes_hide_no_other_note(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    for size in range(1, 1001):
        witness.append(path, note(size))
    with path.open("ab") as file:  # a crash in the middle of an append, a stray byte that is not UTF-8
        file.write(note(1001).encode()[:40] + b"\xff\xfe")
    witness.append(path, note(1002))  # the sealer goes on after its restart
    witness.append(path, note(1003))
    read = sizes(list(witness.notes(path, 990)))
    assert [s for s in read if s >= 990] == [*range(990, 1001), 1002, 1003]


def test_a_note_claiming_a_size_of_thousands_of_digits_claims_none(tmp_path: Path) -> None:
    # The check reads each witness note's claimed size before verifying it (core.audit_roots): a line
    # of 5,000 digits is past what int() reads, and the check stopped with a traceback, no verdict.
    forged = "dermq.test/audit\n" + "9" * 5000 + "\nAAAA\n\n\u2014 dermq.test/audit AAAA\n"
    assert witness.note_size(forged) == -1
    assert witness.note_size(note(12)) == 12
    path = tmp_path / "witness.log"
    for each in (note(1), forged, note(2)):
        witness.append(path, each)
    for since in (0, 1):  # the whole file, and a tail read
        assert sizes(list(witness.notes(path, since))) == [1, 2]


def test_a_missing_file_holds_no_note_and_a_renamed_one_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "witness.log"
    assert list(witness.notes(path, 5)) == [] and list(witness.notes(None, 5)) == []
    witness.append(path, note(1))
    os.replace(path, tmp_path / "witness.log.1")  # rotated by renaming, as logrotate does
    witness.append(path, note(2))
    assert sizes(list(witness.notes(path, 0))) == [2] and sizes(list(witness.notes(tmp_path / "witness.log.1", 0))) == [
        1
    ]
    for since in (0, 2):
        assert list(witness.notes(path, since)) == witness.read_notes(path.read_text())


def test_a_tail_read_far_behind_the_end_reads_no_more_than_its_bound(
    long_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a check catching up from the start of a long log compares with the stored checkpoints there
    monkeypatch.setattr(witness, "TAIL_BYTES", 50_000)
    read = sizes(list(witness.notes(long_file, 1)))
    assert read[-1] == 3000 and 100 < len(read) < 300  # about 50 KB of notes, from the end
