"""core.checkpoint: the C2SP signed-note and tlog-checkpoint formats, byte for byte with Go's reference
implementation (golang.org/x/mod/sumdb/note), and the witness file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from core import checkpoint, merkle
from core import witness as witness_file
from core.checkpoint import Checkpoint, CheckpointError, Signer, Verifier

# The example key pair and signed note of golang.org/x/mod/sumdb/note (note_test.go).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"


def test_keys_and_signatures_match_go_byte_for_byte() -> None:
    signer = Signer.decode(GO_SKEY)
    assert signer.encode() == GO_SKEY
    assert signer.verifier.encode() == GO_VKEY
    assert Verifier.decode(GO_VKEY) == signer.verifier
    assert signer.sign_line(GO_TEXT) == GO_SIG  # Ed25519 is deterministic (RFC 8032)
    with pytest.raises(CheckpointError):
        Verifier.decode(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def test_a_checkpoint_carries_its_time_to_the_millisecond_and_old_whole_second_ones_still_parse() -> None:
    keys = checkpoint.generate("dermq.test/audit")
    root = merkle.root_from_leaf_hashes([merkle.leaf_hash(b"a")])
    when = datetime(2026, 12, 1, 14, 0, 0, 250_000, tzinfo=UTC)
    note = Checkpoint("dermq.test/audit", 1, root, when).sign(keys.signer)
    assert note.split("\n")[3] == "time 2026-12-01T14:00:00.250Z"
    assert checkpoint.parse(note, [keys.signer.verifier]).time == when
    # a checkpoint pinned before the time line had milliseconds
    whole = Checkpoint("dermq.test/audit", 1, root, when.replace(microsecond=0)).sign(keys.signer)
    assert "time 2026-12-01T14:00:00Z" in whole
    assert checkpoint.parse(whole, [keys.signer.verifier]).time == when.replace(microsecond=0)
    odd = Checkpoint("dermq.test/audit", 1, root, when).body().replace("14:00:00.250Z", "yesterday")
    with pytest.raises(CheckpointError, match="time line"):
        checkpoint.parse(odd + "\n" + keys.signer.sign_line(odd), [keys.signer.verifier])


def test_checkpoint_round_trip_and_tampering() -> None:
    keys = checkpoint.generate("dermq.test/audit")
    root = merkle.root_from_leaf_hashes([merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")])
    when = datetime(2026, 12, 1, 14, 0, 0, tzinfo=UTC)
    note = Checkpoint("dermq.test/audit", 2, root, when).sign(keys.signer)
    lines = note.split("\n")
    assert lines[:5] == ["dermq.test/audit", "2", lines[2], "time 2026-12-01T14:00:00Z", ""]
    assert lines[5].startswith("— dermq.test/audit ")
    parsed = checkpoint.parse(note, [keys.signer.verifier])
    assert (parsed.origin, parsed.size, parsed.root, parsed.time) == ("dermq.test/audit", 2, root, when)
    for forged in (note.replace("\n2\n", "\n3\n"), note.replace("14:00:00", "14:00:01")):
        with pytest.raises(CheckpointError, match="signature"):
            checkpoint.parse(forged, [keys.signer.verifier])
    other = checkpoint.generate("dermq.test/audit")
    with pytest.raises(CheckpointError):
        checkpoint.parse(note, [other.signer.verifier])


def test_rotation_keeps_old_checkpoints_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing-key.json"
    keys = checkpoint.generate("dermq.test/audit")
    checkpoint.write_signing_keys(path, keys)
    assert path.stat().st_mode & 0o777 == 0o600
    old_note = Checkpoint("dermq.test/audit", 1, merkle.leaf_hash(b"x"), datetime.now(UTC)).sign(keys.signer)
    rotated = checkpoint.rotate_signing_keys(path, "dermq.test/audit")
    assert rotated.signer.verifier != keys.signer.verifier
    checkpoint.parse(old_note, rotated.verifiers)  # the retired key still verifies what it signed
    assert checkpoint.from_json(__import__("json").loads(path.read_text())).retired == (keys.signer.verifier,)


def test_witness_file_holds_every_note_in_order(tmp_path: Path) -> None:
    keys = checkpoint.generate("dermq.test/audit")
    witness = tmp_path / "witness.log"
    notes = [
        Checkpoint("dermq.test/audit", n, merkle.leaf_hash(bytes([n])), datetime.now(UTC)).sign(keys.signer)
        for n in range(1, 4)
    ]
    for note in notes:
        witness_file.append(witness, note)
    assert witness_file.read_notes(witness.read_text()) == notes
