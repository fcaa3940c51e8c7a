"""``dermq case``: an operator's erasure of one case, and retention run now (each erasure audited)."""

from __future__ import annotations

import uuid

import click

from cli.common import CLI_ACTOR
from core import period_shredding, retention
from core.config import Settings, get_settings
from core.db import session_scope


@click.group(help="cases: erase one, or purge the expired now")
def case() -> None:
    pass


@case.command("erase", help="crypto-shred one case's patient data now, as its clinic's DELETE would (audited)")
@click.argument("case_id", type=click.UUID)
@click.option("--yes", is_flag=True, help="do not ask for the case id back (scripts)")
def erase(case_id: uuid.UUID, yes: bool) -> int:
    """For a patient whose clinic can no longer ask: its keys revoked, the clinic deactivated."""
    if not yes:
        click.echo(
            f"case {case_id}: its image, heat map, client reference, result and confirmed outcome are "
            "crypto-shredded. This cannot be undone.",
            err=True,
        )
        try:
            answer = click.prompt("type the case id to erase it", default="", show_default=False, err=True)
        except click.Abort:  # the input ended without an answer
            answer = ""
        if str(answer).strip().lower() != str(case_id):
            click.echo("not confirmed: the case is left as it was (--yes erases without asking)", err=True)
            return 1
    with session_scope(get_settings()) as session:
        _, erased = retention.erase_by_operator(session, case_id, actor=CLI_ACTOR)
    click.echo(f"case {case_id} {'erased' if erased else 'was already erased (recorded again)'}")
    return 0


@case.command(
    "purge-expired",
    help="crypto-shred every case past DERMQ_RETENTION_DAYS now, then destroy the keys of the periods whose "
    "cases are all purged and past retention plus DERMQ_PERIOD_KEY_GRACE_DAYS, and drop the monthly field "
    "tally's months before DERMQ_FIELD_WINDOW_MONTHS and the settled callback deliveries older than "
    "DERMQ_CALLBACK_HISTORY_DAYS, as beat's purge does",
)
@click.option("--dry-run", is_flag=True, help="say what would be purged, destroyed and dropped, and change nothing")
def purge_expired(dry_run: bool) -> int:
    settings = get_settings()
    if dry_run:
        return _purge_preview(settings)
    # each failure named as it happens: a run that ends later without returning (its database lost)
    # has named it too; the others ran all the same
    report = retention.run(settings, on_failure=lambda failure: click.echo(f"failed: {failure}", err=True))
    click.echo(f"purged {report.purged} expired case(s)")
    # without the destruction, the backups of those periods stayed readable until beat's next purge
    destroyed = report.periods_destroyed
    click.echo(f"destroyed the keys of {len(destroyed)} period(s){': ' + ', '.join(destroyed) if destroyed else ''}")
    months = settings.field_window_months
    click.echo(f"dropped {report.field_cells} monthly field-tally count(s) older than the last {months} months")
    days = settings.callback_history_days
    click.echo(f"deleted {report.callback_deliveries} settled callback delivery record(s) older than {days} days")
    return 1 if report.failures else 0


def _purge_preview(settings: Settings) -> int:
    """What ``purge-expired`` would do now, read without changing anything (nor auditing: no patient
    data is read, only counts and periods)."""
    with session_scope(settings) as session:
        count, oldest = retention.expired_cases(session, settings)
        cells = retention.field_months_due(session, settings)
        deliveries = retention.callback_deliveries_due(session, settings)
    since = f" (the oldest submitted {oldest:%Y-%m-%d})" if oldest is not None else ""
    click.echo(f"would purge {count} expired case(s){since}")
    due = period_shredding.due_for_destruction(settings)
    click.echo(f"would destroy the keys of {len(due)} period(s){': ' + ', '.join(due) if due else ''}")
    click.echo(
        f"would drop {cells} monthly field-tally count(s) older than the last {settings.field_window_months} months"
    )
    days = settings.callback_history_days
    click.echo(f"would delete {deliveries} settled callback delivery record(s) older than {days} days")
    click.echo("dry run: nothing was changed")
    return 0
