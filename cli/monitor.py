"""``dermq monitor``: the model's performance in the field, on cases with a confirmed outcome.

core.outcomes (and ml through it) is imported inside the command, so ``dermq --help`` stays light."""

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


@monitor.command(
    "report",
    help="per model and class: sensitivity, PPV, referral sensitivity (Wilson 95% CI); exit 1 if melanoma "
    "sensitivity is below the model card's lower bound beyond noise (its whole 95% CI below it, on enough cases)",
)
@click.option("--model", "model_id", help="only this model id")
@click.option(
    "--mel-floor",
    type=click.FloatRange(0, 1),
    help="alert below this melanoma sensitivity (default: the lower end of the model card's 95% interval)",
)
@click.option(
    "--min-melanomas",
    type=click.IntRange(1),
    help="confirmed melanomas a model needs before it can be alerted on (default: 20)",
)
@click.option(
    "--months",
    type=click.IntRange(1, 1200),
    help="only cases submitted in the last N months, this month included, N at most DERMQ_FIELD_WINDOW_MONTHS "
    "(the months the monthly tally keeps; counts made before migration 0020 kept no month: they count only "
    "without this)",
)
@json_option()
def report(
    model_id: str | None, mel_floor: float | None, min_melanomas: int | None, months: int | None, as_json: bool
) -> int:
    from core import outcomes
    from ml.labels import CLASSES
    from ml.registry import mel_sensitivity_floor

    settings = get_settings()
    if months is not None and months > settings.field_window_months:
        # the purge dropped the older months: the figures would be the window's under a longer one's name
        click.echo(
            f"error: the monthly tally keeps the last {settings.field_window_months} months only "
            "(DERMQ_FIELD_WINDOW_MONTHS; the purge drops older ones): give --months at most that, "
            "or leave it out for every confirmed case",
            err=True,
        )
        return 2
    since = outcomes.window_start(months) if months is not None else None
    with session_scope(settings) as session:
        found = outcomes.field_performance(outcomes.confirmed_cases(session, model_id=model_id, since=since))
    floors = {
        m: mel_floor if mel_floor is not None else mel_sensitivity_floor(m, configured=settings.model) for m in found
    }
    minimum = min_melanomas if min_melanomas is not None else outcomes.MIN_CONFIRMED_MELANOMAS
    alerts = outcomes.melanoma_alerts(found, floors, min_confirmed=minimum)
    scope = f" of cases submitted since {since.isoformat()}" if since is not None else ""
    if model_id is not None and model_id not in found:  # a mistyped id must not read as "all is well"
        click.echo(f"error: no confirmed outcomes{scope} for model {model_id!r}: nothing was checked", err=True)
        return 2
    if as_json:
        window = {"since": since.isoformat() if since is not None else None}
        click.echo(json.dumps({"models": found, "floors": floors, "alerts": alerts} | window, sort_keys=True))
        return 1 if alerts else 0
    if not found:
        click.echo(f"no confirmed outcomes{scope} yet")
        return 0
    if since is not None:
        click.echo(f"cases submitted since {since.isoformat()} (the last {months} months, this one included)")
    for model, figures in found.items():
        click.echo(
            f"{model}: {figures['confirmed']} confirmed cases "
            f"({figures['out_of_distribution']} out of distribution: no diagnosis, counted as missed)"
        )
        click.echo(f"  {'class':<6} {'sensitivity':<36} {'PPV':<36}")
        for code in CLASSES:
            rates = figures["classes"][code]
            click.echo(f"  {code:<6} {_rate(rates['sensitivity']):<36} {_rate(rates['ppv']):<36}")
        click.echo(f"  referral sensitivity (mel, bcc, akiec referred): {_rate(figures['referral_sensitivity'])}")
        if floors[model] is None:
            click.echo("  melanoma sensitivity floor: none in the model card (not checked; give --mel-floor)")
    for alert in alerts:
        low, high = alert["ci95"]
        click.echo(
            f"ALERT {alert['model_id']}: melanoma sensitivity {alert['observed']:.3f} [{low:.3f}, {high:.3f}] on "
            f"{alert['confirmed_melanomas']} confirmed melanomas: the whole 95% interval is below {alert['floor']:.3f}"
        )
    return 1 if alerts else 0
