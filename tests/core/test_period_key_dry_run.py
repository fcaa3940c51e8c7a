"""``dermq case purge-expired --dry-run`` names the periods whose keys the purge then destroys, as
destroy_period judges them (tests/core/test_period_keys.py has the destruction itself)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from core import keyrotation, period_shredding, retention
from core.db import session_scope
from core.models import Case, CaseStatus
from tests.core.test_period_keys import NOW, Site, case_created, destroy_expired, site  # noqa: F401  (site: the fixture)

pytestmark = pytest.mark.usefixtures("database")


def test_the_dry_run_names_the_periods_the_purge_then_destroys(site: Site) -> None:  # noqa: F811
    """``dermq case purge-expired --dry-run``: a period qualifies as destroy_period judges it, after the
    expired cases are purged; a case purged by an older release that left a blob under its period's
    key keeps that key (the dry run named it, and the real run refused it, every run)."""
    expiring_at, stray_at = NOW - timedelta(days=150), NOW - timedelta(days=100)
    expiring, stray = case_created(site, expiring_at, b"expired"), case_created(site, stray_at, b"left behind")
    assert keyrotation.rewrap_all(site.settings).remaining == 0
    with session_scope(site.settings) as session:  # purged, but one of its blobs is still there
        session.execute(
            update(Case)
            .where(Case.id == stray)
            .values(status=CaseStatus.PURGED.value, purged_at=NOW - timedelta(days=1))
        )
    gone, kept = site.period(expiring_at), site.period(stray_at)
    predicted = period_shredding.due_for_destruction(site.settings)
    assert gone in predicted and kept not in predicted
    with session_scope(site.settings) as session:
        assert session.get(Case, expiring).status == CaseStatus.SUCCEEDED.value  # type: ignore[union-attr]
    with session_scope(site.settings) as session:
        retention.purge_expired(session, site.settings)
    assert destroy_expired(site.settings) == predicted
