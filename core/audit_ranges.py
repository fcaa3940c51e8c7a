"""How an auditor's search with a time range (``since``, ``until``) reads its page of events.

A page is the newest matching events by id. Asked for that (``ORDER BY id DESC LIMIT n``), Postgres
walks the primary key backwards and tests each event's time, taking matches to be spread evenly over
the ids; they are not: ids and times rise together. A range in the past had every newer event read
before its first page, and the last page of any range every older event, looking for one more
match: a third of a second a million events on a 2-core host, from memory; with tens of millions,
the statement timeout (a search's ``503``, an export cut off mid-body, every time).

A range that spans few events, or far fewer than the walk would pass over before reaching it (judged
by the ids of its first and last event in time: index probes), is read whole instead, from the time
index or whatever index the other filters name, and sorted by id: its cost is the range's, not the
log's. The judgement only chooses the plan; both return the same events, so an id out of time order
(a clock stepped back) cannot make a page miss one. Left as it was: a wide range far back (a year,
years ago) is still walked to, where reading it whole would cost about as much; and a later page
whose cursor lies inside a range that spans more than NARROW_RANGE_EVENTS ids is walked, so the
last page of such a range with another filter (a clinic's month, its matches sparse) still reads
every older event looking for one more match (an exact lower id bound would end that walk at the
range's first event, at the price of an index scan of the range).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import AuditEvent

#: events (by id) a time range may span to be read whole wherever it lies (about 10 ms on a 2-core host)
NARROW_RANGE_EVENTS = 10_000
#: how much cheaper an event passed over by the walk backwards is than one read whole (a time index
#: entry, its row, the sort): a range further back than this many times its span is read whole
WALK_COST_RATIO = 4


def read_whole(session: Session, since: datetime | None, until: datetime | None, before_id: int | None) -> bool:
    """Whether to read the events in [``since``, ``until``) below ``before_id`` whole: they span few ids
    (:data:`NARROW_RANGE_EVENTS`), or far fewer than a walk backwards would pass over before reaching
    them (:data:`WALK_COST_RATIO`).
    False without a time range."""
    if since is None and until is None:
        return False
    low = 0
    if since is not None:
        first = session.scalar(
            select(AuditEvent.id).where(AuditEvent.occurred_at >= since).order_by(AuditEvent.occurred_at).limit(1)
        )
        if first is None:
            return True  # nothing as late: an empty range
        low = first
    top = before_id - 1 if before_id is not None else session.scalar(select(func.max(AuditEvent.id))) or 0
    high = top
    if until is not None:
        last = session.scalar(
            select(AuditEvent.id).where(AuditEvent.occurred_at < until).order_by(AuditEvent.occurred_at.desc()).limit(1)
        )
        if last is None:
            return True  # nothing as early: an empty range
        high = min(high, last)
    span = high - low
    return span < NARROW_RANGE_EVENTS or span * WALK_COST_RATIO <= top - high
