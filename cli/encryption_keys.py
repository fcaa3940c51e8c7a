"""``dermq keys``: the key file's key-encryption keys (create, rotate, re-wrap, status, retire) and the
period keys (list, destroy).

core.keyrotation is imported by the commands that use it, so ``dermq --help`` does not load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.common import CLI_ACTOR, Progress, json_option
from core.config import Settings, get_settings
from core.crypto import Keyring, load_keyring, write_key_file
from core.db import session_scope

if TYPE_CHECKING:
    from core.keyrotation import RewrapReport

batch_option = click.option(
    "--batch", type=click.IntRange(min=1), default=500, show_default=True, help="data keys per committed batch"
)


@click.group(help="encryption keys")
def keys() -> None:
    pass


@keys.command(
    "init",
    help="create the key file, the audit log's signing key (mode 0600) and the period-key folder beside it if missing",
)
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="path (default: DERMQ_KEY_FILE)")
def init(file: Path | None) -> int:
    path = file or get_settings().key_file
    if path is None:
        click.echo("error: no key file path (set DERMQ_KEY_FILE or pass --file)", err=True)
        return 2
    from core import audit_commands
    from core.period_keys import PeriodKeys

    if path.exists():
        click.echo(f"key file {path} exists; leaving it alone")
    else:
        write_key_file(path, Keyring.generate())
        click.echo(f"created key file {path} (mode 0600); back it up: without it, stored images cannot be decrypted")
    settings = get_settings().model_copy(update={"key_file": path})
    folder = settings.period_key_folder
    if folder is not None and PeriodKeys(folder, settings).create_folder():
        click.echo(f"created the period-key folder {folder} (mode 0700); never back it up")
    click.echo(audit_commands.ensure_signing_key(settings))
    return 0


@keys.command("rotate", help="add a new active key and re-wrap every data key")
@batch_option
@click.option(
    "--no-rewrap",
    is_flag=True,
    help="only add the new active key to the key file: for a copy of a key file the running services "
    "mount (deploy/README.md); run `dermq keys rewrap` once every process reads the new file",
)
def rotate(batch: int, no_rewrap: bool) -> int:
    from core import keyrotation

    if no_rewrap:
        report = keyrotation.rotate(get_settings(), actor=CLI_ACTOR, rewrap=False)
        click.echo(f"active key is now {report.active}; nothing re-wrapped: run `dermq keys rewrap` once deployed")
        return 0
    with Progress("re-wrapping data keys") as progress:
        report = keyrotation.rotate(get_settings(), batch=batch, actor=CLI_ACTOR, progress=progress)
    click.echo(f"active key is now {report.active}; re-wrapped {report.rewrapped} data keys, {report.remaining} remain")
    _say_skipped(report)
    return 0 if report.remaining == 0 else 1


@keys.command("rewrap", help="resume re-wrapping under the active key")
@batch_option
def rewrap(batch: int) -> int:
    from core import keyrotation

    with Progress("re-wrapping data keys") as progress:
        report = keyrotation.rewrap_all(get_settings(), batch=batch, actor=CLI_ACTOR, progress=progress)
    click.echo(f"re-wrapped {report.rewrapped} data keys under {report.active}; {report.remaining} remain")
    _say_skipped(report)
    if report.remaining > len(report.skipped):
        click.echo(
            "what remains is locked by a running case (run again) or under a key the key file lacks "
            "(`dermq keys status` names it)",
            err=True,
        )
    return 0 if report.remaining == 0 else 1


#: skipped rows named on the terminal; the log names every one (event ``rewrap_skipped``)
SKIPPED_SHOWN = 20


def _say_skipped(report: RewrapReport) -> None:
    """Name the rows a re-wrap left under their old key, and what to do about them."""
    if not report.skipped:
        return
    click.echo(f"{len(report.skipped)} rows could not be re-wrapped and were left under their old key:", err=True)
    for row in report.skipped[:SKIPPED_SHOWN]:
        click.echo(f"  {row.row}: {row.reason}", err=True)
    if len(report.skipped) > SKIPPED_SHOWN:
        click.echo(f"  and {len(report.skipped) - SKIPPED_SHOWN} more (the log names each: rewrap_skipped)", err=True)
    click.echo(
        "a case's or a callback secret's cannot be opened (erase the case with `dermq case erase ID`; the clinic "
        "registers its callback again); a period key file that cannot be read needs mending (its mode: chmod 600) "
        "and another `dermq keys rewrap`; `dermq keys retire` refuses the old key while any remain",
        err=True,
    )


@keys.command(
    "status", help="blobs per key-encryption key; exit 1 if one they need is missing or a period key cannot be read"
)
@json_option()
def status(as_json: bool) -> int:
    from core import keyrotation
    from core.periods import period_of_kek

    settings = get_settings()
    keyring = load_keyring(settings)
    with session_scope(settings) as session:
        counts = keyrotation.usage(session)
    wrapped = keyrotation.period_usage(keyring)
    unreadable = keyrotation.unreadable_period_keys(keyring)
    periods = keyring.periods

    def present(kek: str) -> bool:
        period = period_of_kek(kek)
        return kek in keyring.keks or (period is not None and periods is not None and periods.exists(period))

    # the key file's KEKs, then any the data need that it lacks: blobs wrapped under one, or period
    # keys (a key file restored from before a rotation that moved them under a newer KEK)
    lacking = sorted((set(counts) | set(wrapped)) - set(keyring.keks))
    rows = [
        {
            "kek_id": k,
            "active": k == keyring.active_id,
            "in_key_file": present(k),
            "blobs": counts.get(k, 0),
            "period_keys": wrapped.get(k, 0),
        }
        for k in [*keyring.keks, *lacking]
    ]
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            flags = "active " if row["active"] else ("MISSING" if not row["in_key_file"] else "       ")
            extra = f", {row['period_keys']} period keys" if row["period_keys"] else ""
            click.echo(f"{row['kek_id']}  {flags}  {row['blobs']} blobs{extra}")
    for entry in unreadable:  # wrapped under a KEK nobody can tell
        click.echo(f"period key {entry.period} cannot be read: {entry.problem}", err=True)
    return 0 if all(r["in_key_file"] for r in rows) and not unreadable else 1


@keys.command("retire", help="remove an old key from the key file once nothing needs it")
@click.argument("kek_id")
def retire(kek_id: str) -> int:
    from core import keyrotation

    keyrotation.retire(get_settings(), kek_id, actor=CLI_ACTOR)
    click.echo(f"removed {kek_id} from the key file")
    return 0


@keys.command("periods", help="period keys: cases, live cases and blobs of each, when retention destroys it")
@json_option()
def periods(as_json: bool) -> int:
    from core import period_shredding

    settings = get_settings()
    with session_scope(settings) as session:
        rows = [p.as_dict() for p in period_shredding.periods(session, settings)]
    unreadable = [row for row in rows if row["problem"]]
    if as_json:
        click.echo(json.dumps(rows))
        return 1 if unreadable else 0
    if not rows:
        click.echo("no period keys yet (the first case creates its period's key)")
        return 0
    click.echo(f"{'period':<10} {'state':<9} {'cases':>6} {'live':>6} {'blobs':>7}  destroyed / destroy after")
    for row in rows:
        when = row["destroyed_at"] or row["destroy_after"]
        click.echo(
            f"{row['period']:<10} {row['state']:<9} {row['cases']:>6} {row['live']:>6} {row['blobs']:>7}  {when}"
        )
    for row in unreadable:  # its cases cannot be opened here
        click.echo(f"period key {row['period']} cannot be read: {row['problem']}", err=True)
    return 1 if unreadable else 0


@keys.command("destroy-period", help="destroy a period's key: its blobs, in the database or a backup, are lost")
@click.argument("period")
@click.option("--force", is_flag=True, help="purge the period's cases that are not purged yet, then destroy")
@click.option("--yes", is_flag=True, help="do not ask for the period's name back (scripts)")
def destroy_period(period: str, force: bool, yes: bool) -> int:
    from core import period_shredding

    settings = get_settings()
    if not yes and not _confirmed(settings, period, force):
        click.echo(
            f"not confirmed: the key of period {period} is left as it was (--yes destroys without asking)", err=True
        )
        return 1
    done = period_shredding.destroy_period(settings, period, force=force, actor=CLI_ACTOR)
    if done.get("already"):
        click.echo(f"the key of period {period} was already destroyed (the audit trail records it); nothing to do")
        return 0
    purged = f"; purged {done['purged']} live cases first" if done["purged"] else ""
    click.echo(f"destroyed the key of period {period}{purged}: no copy of its cases can be decrypted any more")
    return 0


def _confirmed(settings: Settings, period: str, force: bool) -> bool:
    """Says what the destruction loses and asks for the period's name back on standard input. Only a
    destruction that would go ahead asks: an unknown, current or already destroyed period, or one with
    live cases and no ``--force``, is refused or left by the command itself."""
    from core import period_shredding

    with session_scope(settings) as session:
        found = [p for p in period_shredding.periods(session, settings) if p.period == period]
    if not found or found[0].state != "ended" or (found[0].live and not force):
        return True
    row = found[0]
    purges = f"; --force purges its {row.live} live case(s) first" if row.live else ""
    click.echo(
        f"period {period}: {row.cases} case(s), {row.blobs} blob(s) sealed under its key{purges}. Destroying the "
        "key cannot be undone: no copy of those blobs, in the database or in any backup, can be decrypted again.",
        err=True,
    )
    try:
        answer = click.prompt(f"type {period} to destroy its key", default="", show_default=False, err=True)
    except click.Abort:  # the input ended without an answer
        return False
    return str(answer).strip() == period
