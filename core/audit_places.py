"""Places in the audit log kept in files beside the witness file, where the database's logins cannot write.

A place is a tree size and its compact range (:class:`core.merkle.CompactRange`): where the periodic
check resumes (``<witness>.check``, :mod:`core.audit_resume`) and where the re-walk goes on
(``<witness>.rewalk``, :mod:`core.audit_rewalk`). Each is JSON, replaced whole. A file that is
missing, torn or not ours reads as no place (the walk starts from the beginning), and one that cannot
be written leaves the old place (the walk is done again): neither ever decides a verdict, and a place
read back counts only where a signed checkpoint vouches for its root
(:func:`core.audit_resume.trusted_start`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from pathlib import Path

from core import merkle


def beside(witness: Path, suffix: str) -> Path:
    """The file ``suffix`` names beside the witness file."""
    return witness.with_name(witness.name + suffix)


def read(path: Path) -> merkle.CompactRange | None:
    """The place kept in ``path`` (None: start from the beginning)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return merkle.CompactRange(int(data["size"]), [base64.b64decode(h, validate=True) for h in data["frontier"]])
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or not ours: from the beginning
        return None


def write(path: Path, place: merkle.CompactRange | None) -> None:
    """Keep ``place`` in ``path`` (None: the next walk starts from the beginning), replacing the file
    whole; a volume that refuses the write leaves the old place."""
    if place is None:
        with contextlib.suppress(OSError):  # gone already, or a volume that refuses
            path.unlink()
        return
    data = {"size": place.size, "frontier": [base64.b64encode(h).decode() for h in place.hashes]}
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
