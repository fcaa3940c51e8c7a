"""``dermq demo``: the local demo clinic and key that ``make run`` prints (core.demo does the work)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import CLI_ACTOR
from core import demo as local_demo
from core.config import get_settings


@click.command("demo", help="create the local demo clinic and key (make run)")
@click.option("--clinic", "clinic_name", default=local_demo.DEMO_CLINIC, show_default=True)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=local_demo.DEMO_KEY_FILE,
    show_default=True,
    help="where the key is kept between runs (mode 0600)",
)
def demo(clinic_name: str, key_file: Path) -> int:
    settings = get_settings()
    if settings.environment == "production":  # a live clinic key printed and left in a file is not a demo
        click.echo("error: dermq demo makes a clinic and a live key for local use; refused in production", err=True)
        return 2
    made = local_demo.ensure_demo_key(settings, clinic_name=clinic_name, key_file=key_file, actor=CLI_ACTOR)
    for line in local_demo.instructions(settings, made, clinic_name=clinic_name, key_file=key_file):
        click.echo(line)
    return 0
