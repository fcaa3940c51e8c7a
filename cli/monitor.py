"""``dermq monitor``: the model's performance in the field, on cases with a confirmed outcome.

core.outcomes (and ml.labels through it) is imported inside the command, so ``dermq --help`` stays light."""

from __future__ import annotations

import json
from typing import Any

import click

from cli.common import json_option
from core.config import get_settings
from core.db import session_scope


@click.group(help="field performance on confirmed outcomes")
def monitor() -> None:
    pass


def _rate(rate: dict[str, Any]) -> str:
    if rate["value"] is None:
        return f"{'n/a':>6} {'':<15} (0/0)"
    low, high = rate["ci95"]
    return f"{rate['value']:>6.3f} [{low:.3f}, {high:.3f}] ({rate['successes']}/{rate['trials']})"


@monitor.command("report", help="per model and class: sensitivity, PPV, referral sensitivity (Wilson 95% CI)")
@click.option("--model", "model_id", help="only this model id")
@json_option()
def report(model_id: str | None, as_json: bool) -> int:
    from core import outcomes
    from ml.labels import CLASSES

    with session_scope(get_settings()) as session:
        found = outcomes.field_performance(outcomes.confirmed_cases(session, model_id=model_id))
    if as_json:
        click.echo(json.dumps(found, sort_keys=True))
        return 0
    if not found:
        click.echo("no confirmed outcomes yet")
        return 0
    for model, figures in found.items():
        click.echo(
            f"{model}: {figures['confirmed']} confirmed cases "
            f"({figures['out_of_distribution']} out of distribution, not scored)"
        )
        click.echo(f"  {'class':<6} {'sensitivity':<36} {'PPV':<36}")
        for code in CLASSES:
            rates = figures["classes"][code]
            click.echo(f"  {code:<6} {_rate(rates['sensitivity']):<36} {_rate(rates['ppv']):<36}")
        click.echo(f"  referral sensitivity (mel, bcc, akiec referred): {_rate(figures['referral_sensitivity'])}")
    return 0
