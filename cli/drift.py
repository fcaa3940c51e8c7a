"""``dermq drift``: how far recent inputs and diagnoses have moved from the model's reference.

worker.drift (numpy, through ml.drift) is imported inside the command, so the other groups stay light."""

from __future__ import annotations

import json
from datetime import datetime

import click

from cli.common import CLI_ACTOR, json_option
from core.config import get_settings
from core.db import session_scope


@click.group(help="input and prediction drift")
def drift() -> None:
    pass


@drift.command("report", help="PSI against the model's reference; exit 1 if drifted")
@click.option(
    "--day",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="YYYY-MM-DD: that UTC day (default: the 24 hours up to now)",
)
@json_option()
def report(day: datetime | None, as_json: bool) -> int:
    from worker import drift as drift_reports

    if day is not None and not datetime.min + drift_reports.LOOKBACK < day < datetime.max - drift_reports.WINDOW:
        raise click.BadParameter("the day is too close to the calendar's ends", param_hint="--day")
    settings = get_settings()
    with session_scope(settings) as session:
        found = drift_reports.day_report(session, settings, day.date() if day else None, actor=CLI_ACTOR)
    if as_json:
        click.echo(json.dumps(found))
    else:
        click.echo(
            f"drift on {found['day']} for {found['model_id']}: {found['n']} cases "
            f"(reference: {found['reference_n']} validation images; alert above PSI {found['threshold']})"
        )
        click.echo(f"  status: {found['status']}" + (f" ({found['note']})" if found.get("note") else ""))
        p_values = found.get("p_value", {})
        for feature, value in found["psi"].items():
            flag = "  DRIFT" if feature in found["drifted"] else ""
            p_value = p_values.get(feature)
            p_text = f"  p {p_value:.4f}" if p_value is not None else ""
            click.echo(f"  {feature:<11} PSI {'n/a' if value is None else f'{value:.3f}'}{p_text}{flag}")
    return 1 if found["drifted"] else 0
