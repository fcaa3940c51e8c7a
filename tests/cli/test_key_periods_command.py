"""``dermq keys periods``, which the runbook has an operator run in a worker to see the periods it can
read, says when it cannot: a key file it cannot read (it was listed like any other, exit 0), a folder
that is not there, or an empty one while the database holds data sealed under period keys (a volume
not mounted: it said "no period keys yet" and exited 0)."""

from __future__ import annotations

from datetime import timedelta

from core import keyrotation
from tests.cli.test_commands import run
from tests.core.test_period_keys import NOW, Site, case_created, site  # noqa: F401  (site: the fixture)


def test_keys_periods_says_what_it_cannot_read(site: Site) -> None:  # noqa: F811
    when = NOW - timedelta(days=40)
    case_created(site, when, b"sealed under its period's key")
    keyrotation.rewrap_all(site.settings)
    period = site.period(when)
    folder = site.settings.period_key_folder
    assert folder is not None
    assert run(site.settings, "keys", "periods").returncode == 0

    (folder / f"{period}.json").chmod(0o644)  # readable by others: refused
    try:
        exposed = run(site.settings, "keys", "periods")
    finally:
        (folder / f"{period}.json").chmod(0o600)
    assert exposed.returncode == 1 and f"period key {period} cannot be read" in exposed.stderr, exposed.stderr

    away = folder.rename(folder.with_name("elsewhere"))
    try:
        missing = run(site.settings, "keys", "periods")
        folder.mkdir(mode=0o700)  # the empty folder an image makes, without the shared volume
        empty = run(site.settings, "keys", "periods")
        folder.rmdir()
    finally:
        away.rename(folder)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stdout + missing.stderr
    assert empty.returncode == 2 and "holds no key" in empty.stderr, empty.stdout + empty.stderr
    assert "no period keys yet" not in empty.stdout
