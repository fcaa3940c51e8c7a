"""The signed roots a walk of the whole audit log compares with, read as the walk goes.

A check of the whole log (``dermq audit verify``) compares the recomputed tree with every signed
checkpoint: the stored ones and the witness file's. The sealer makes one about every second while
events come in, about 31 million a year; holding them all took about 0.3 KB each, some 10 GB for a
year's (``python -m bench.audit_verify``: 10.9 MB at 2,000 checkpoints, one each 10 events, 13.4 MB
at 10,000, one each 5). :class:`RootStream` reads them in the order of their tree sizes as the walk reaches them,
so its memory is a page or two of stored checkpoints and a few witness notes, whatever the log's
length (10.7 and 10.8 MB in the same runs, which checked the old chain too; the walk alone held 1.4
MB at 2,000 checkpoints, 5.5 MB at 10,000 and 6.7 MB at 20,000, where its two pages are full):

- stored checkpoints: pages in size order (the primary key), of :data:`FIRST_PAGE` rows at first,
  twice as many each time up to :data:`PAGE`;
- the witness file: forward, a note at a time. Sealers append in the order they finish, a few notes
  apart (:data:`core.witness.SLACK`), so the stream reads :data:`LOOKAHEAD` notes of larger trees
  past the size the walk asks for before it answers. A note of a tree the walk has already passed (a
  sealer held up between its commit and its append) is held to the stored checkpoint of its size,
  which the walk read in order; with none of its root, the check fails and says so. A note the same
  as the stored checkpoint of its size (the sealer writes both) is not verified twice.

The witness file is read as it was when the stream was made, and the stored checkpoints up to the
log's size then: a sealer goes on while a long check runs, and the walk's cursor may not see the
events of what it seals (the log would seem to end before a signed checkpoint).

Signatures are checked as the notes are read (with ``verifiers``; without, stored roots are taken as
they are and the witness file is not read). The first stored checkpoint that fails its check is
:attr:`RootStream.problem`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from core import audit_log
from core import witness as witness_file
from core.checkpoint import CheckpointError, Verifier, parse

#: stored checkpoints read at a time, at most
PAGE = 5000
#: stored checkpoints the first read takes
FIRST_PAGE = 64
#: witness notes of trees larger than the one asked for, read before answering for it
LOOKAHEAD = 4 * witness_file.SLACK

_PAGE_SQL = text(
    "SELECT size, root, note FROM audit_checkpoints WHERE size > :after AND size <= :until ORDER BY size LIMIT :page"
)
_STORED_ROOT = text("SELECT root FROM audit_checkpoints WHERE size = :size")
_NO_LIMIT = 2**63 - 1


class RootStream:
    """Signed roots by tree size, for sizes asked for in increasing order (:meth:`get`).

    With ``since``, only checkpoints of that many events or more: a check that resumes there needs no
    older one (their signatures were checked by the check it resumes), and the witness file is read
    from its end as far back as they go (:func:`core.witness.notes`). With ``until``, none of more
    events: what a check that stops there needs. :meth:`highest` reads what is left, and gives the
    largest tree any of them has: the size the log must reach."""

    def __init__(
        self,
        session: Session,
        verifiers: Sequence[Verifier] | None,
        witness: Path | None = None,
        *,
        since: int = 0,
        until: int | None = None,
        page: int = PAGE,
    ) -> None:
        self.session = session
        self.verifiers = None if verifiers is None else list(verifiers)
        self.since, self.until, self.page = since, until, page
        # the first page is small, and each next one twice as large up to ``page``: a check that walks
        # a few checkpoints (each minute's, a re-walk's slice under heavy traffic) checks few signatures
        self._rows = min(FIRST_PAGE, page)
        #: the first checkpoint that fails its check, said when the stream reads it
        self.problem: str | None = None
        self._roots: dict[int, list[bytes]] = {}  # read, not asked for yet
        self._sizes: list[int] = []  # a heap of the sizes in ``_roots``
        self._stored_notes: dict[int, str] = {}  # the verified stored note of sizes not asked for yet
        self._stored_after = since - 1  # the largest stored size read
        self._stored_done = False
        self._ahead: list[int] = []  # a heap of the sizes of witness notes read, larger than the last asked
        # The witness file as it is now, then the log's size: every note read names a tree the walk's
        # later reads see. Checkpoints sealed after this (a sealer goes on while a long check runs) are
        # not read: the walk's cursor may not see their events (the log "ended" before them).
        self._notes: Iterator[str] = iter(()) if self.verifiers is None else witness_file.notes(witness, since)
        self._notes_done = self.verifiers is None
        self._bound = audit_log.tree_size(session)
        self._until = self._bound if until is None else min(until, self._bound)
        self._asked = since - 1
        self._largest = 0
        self._draining = False

    def add(self, size: int, root: bytes) -> None:
        """A root from elsewhere (a pinned checkpoint, the witness scan's largest) to compare at ``size``."""
        if size <= self._asked:
            raise ValueError(f"size {size} was asked for already")
        self._keep(size, root)
        self._largest = max(self._largest, size)

    def get(self, size: int) -> list[bytes] | None:
        """The signed roots of ``size`` (None: there are none); sizes are asked for in increasing order."""
        if size <= self._asked:
            raise ValueError(f"roots are read in increasing order of size: {size} after {self._asked}")
        self._read_stored(size)
        while not self._notes_done and self._witness_ahead(size) < LOOKAHEAD:
            self._next_note()
        self._asked = size
        found: list[bytes] = []
        while self._sizes and self._sizes[0] <= size:
            at = heapq.heappop(self._sizes)
            self._stored_notes.pop(at, None)
            if at == size:
                found += self._roots.pop(at, [])
            else:  # a size the walk went past without asking (it stopped comparing)
                self._roots.pop(at, None)
        return found or None

    def highest(self) -> int:
        """The largest tree size of any signed checkpoint, once every one is read (signatures checked)."""
        self._draining = True
        self._roots.clear()
        self._sizes.clear()
        self._stored_notes.clear()
        self._stored_done = False  # the rows past the log's size at the start, too (see _page)
        while not self._stored_done:
            self._page()
        while not self._notes_done:
            self._next_note()
        return self._largest

    def _keep(self, size: int, root: bytes) -> None:
        if self._draining:
            return
        if size not in self._roots:
            heapq.heappush(self._sizes, size)
        self._roots.setdefault(size, []).append(root)

    # ---------------------------------------------------------------- stored checkpoints

    def _read_stored(self, size: int) -> None:
        while not self._stored_done and self._stored_after < size:
            self._page()

    def _page(self) -> None:
        # Draining, past the log's size at the start too: a stored row its note does not vouch for is a
        # problem wherever it is; one sealed since is not larger than the log the walk saw.
        until = (_NO_LIMIT if self.until is None else self.until) if self._draining else self._until
        rows = self.session.execute(_PAGE_SQL, {"after": self._stored_after, "until": until, "page": self._rows}).all()
        self._stored_done = len(rows) < self._rows
        self._rows = min(2 * self._rows, self.page)
        # Read after the page: a checkpoint sealed since the start has its leaves in the log now (one
        # commit); one larger than the log now is of events removed from its end (a truncation)
        now = self._bound
        if self._draining and rows and rows[-1][0] > self._bound:
            now = audit_log.tree_size(self.session)
        for size, root, note in rows:
            self._stored_after = size
            if self.verifiers is not None:
                try:
                    parsed = parse(note, self.verifiers)
                except CheckpointError:
                    self.problem = self.problem or f"the stored checkpoint of size {size} has no valid signature"
                    continue
                if (parsed.size, parsed.root) != (size, bytes(root)):
                    self.problem = self.problem or f"the stored checkpoint of size {size} differs from its signed note"
                    continue
                if not self._draining:
                    self._stored_notes[size] = note
            if size <= self._bound or size > now:
                self._largest = max(self._largest, size)
            if size > self._asked:
                self._keep(size, bytes(root))

    # ---------------------------------------------------------------- the witness file

    def _witness_ahead(self, size: int) -> int:
        """How many witness notes read are of trees larger than ``size``."""
        while self._ahead and self._ahead[0] <= size:
            heapq.heappop(self._ahead)
        return len(self._ahead)

    def _next_note(self) -> None:
        note = next(self._notes, None)
        if note is None:
            self._notes_done = True
            return
        size = witness_file.note_size(note)
        if self.until is not None and size > self.until:  # past what the walk compares: read ahead all
            if not self._draining:  # the same (not the rest of a long file, note by note)
                heapq.heappush(self._ahead, size)
            return
        if size < self.since:
            return  # before what the walk compares (or no tree size: not a checkpoint)
        # the stored checkpoints as far as this note, to know it if it is one of them: as many as the
        # notes read ahead need, and a page
        while not self._draining and not self._stored_done and self._stored_after < size:
            if len(self._roots) >= self.page + 2 * LOOKAHEAD:
                break
            self._page()
        if self._stored_notes.get(size) == note:  # the stored checkpoint of this size, verified already
            heapq.heappush(self._ahead, size)  # (never while draining: none are kept then)
            return
        assert self.verifiers is not None
        try:
            parsed = parse(note, self.verifiers)
        except CheckpointError:
            return  # a witness line nobody signed proves nothing (and is not one of the notes read ahead)
        self._largest = max(self._largest, parsed.size)
        if parsed.size <= self._asked:
            self._late(parsed.size, parsed.root)
            return
        self._keep(parsed.size, parsed.root)
        if not self._draining:
            heapq.heappush(self._ahead, parsed.size)

    def _late(self, size: int, root: bytes) -> None:
        """A note of a tree the walk has passed (a sealer held up between its commit and its append
        while others sealed on): it agrees with the stored checkpoint of its size, which the walk read
        in order, or it cannot be compared."""
        stored = self.session.scalar(_STORED_ROOT, {"size": size})
        if stored is not None and bytes(stored) == root:
            return
        self.problem = self.problem or (
            f"the witness file's checkpoint of size {size} comes after checkpoints of more than {LOOKAHEAD} "
            "larger trees, and no stored checkpoint of its size has its root: it was not compared with the log"
        )
