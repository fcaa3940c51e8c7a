"""Cross-checks between the deployment files and the code: setting names, commands, images and
secrets. Each catches a drift that would break a deployment or leak a secret."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from tests.deploy import manifests as m

SHELL_OPERATORS = {">", ">>", "<", "|", "||", "&&", ";", "2>&1"}


def deployment_files() -> list[Path]:
    """Every text file of the deployment story (deploy/secrets holds only its README in git)."""
    files = [m.COMPOSE_FILE, m.DOCKERIGNORE]
    for path in sorted(m.DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        if path.parent == m.DEPLOY / "secrets" and path.name not in ("README.md", ".gitignore"):
            continue  # an operator's real secret files on a deployment host; never in git
        files.append(path)
    return files


# --------------------------------------------------------------------------- DERMQ_* names


def test_every_dermq_variable_names_a_setting() -> None:
    known = m.settings_variables() | m.NON_FIELD_VARIABLES
    unknown: dict[str, list[str]] = {}
    for path in deployment_files():
        for name in set(m.DERMQ_VARIABLE.findall(path.read_text(errors="replace"))):
            if name not in known:
                unknown.setdefault(name, []).append(str(path.relative_to(m.ROOT)))
    assert not unknown, f"not fields of core.config.Settings: {unknown}"


def test_the_exceptions_are_read_by_the_settings_module() -> None:
    source = (m.ROOT / "core" / "config.py").read_text()
    for name in m.NON_FIELD_VARIABLES:
        assert f'"{name}"' in source, f"{name} is no longer read by core/config.py"


def test_the_variable_check_would_catch_a_typo() -> None:
    assert "DERMQ_WORKER_CONCURENCY" not in m.settings_variables()
    assert "DERMQ_WORKER_CONCURRENCY" in m.settings_variables()


def test_variables_are_set_where_they_are_used() -> None:
    # Every compose and k8s environment key that starts with DERMQ_ is checked above; here the
    # structured places (not just any text) are collected, so that the check cannot miss them.
    names: set[str] = set()
    for service in m.compose_services().values():
        names |= set(m.compose_environment(service))
    for w in m.workloads():
        for container in w.containers:
            names |= set(m.container_environment(container))
    for path in m.DOCKERFILES.values():
        names |= set(m.dockerfile_runtime_env(path))
    dermq = {name for name in names if name.startswith("DERMQ_")}
    assert len(dermq) > 15
    assert dermq <= m.settings_variables() | m.NON_FIELD_VARIABLES


# --------------------------------------------------------------------------- commands


def _commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in m.compose_services().items():
        if m.compose_image_kind(service) is None:
            continue
        command = m.compose_command(service)
        if command:
            yield f"compose {name}", command
        test = (service.get("healthcheck") or {}).get("test")
        if test and test[0] in ("CMD", "CMD-SHELL"):
            yield f"compose {name} healthcheck", test[1:] if test[0] == "CMD" else shlex.split(test[1])
    for w in m.workloads():
        for container in w.containers:
            yield f"k8s {w.name}", [*container.get("command", []), *container.get("args", [])]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if "exec" in container.get(probe, {}):
                    yield f"k8s {w.name} {probe}", container[probe]["exec"]["command"]
    for kind, path in m.DOCKERFILES.items():
        for instruction in m.dockerfile_instructions(path):
            if instruction.keyword == "CMD":
                yield f"Dockerfile.{kind} CMD", m.exec_form(instruction.args) or shlex.split(instruction.args)
            if instruction.keyword == "HEALTHCHECK":
                command = instruction.args.split(" CMD ", 1)[1]
                yield f"Dockerfile.{kind} HEALTHCHECK", m.exec_form(command) or shlex.split(command)


def _simple_command(argv: list[str]) -> list[str]:
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2])
    for index, token in enumerate(argv):
        if token in SHELL_OPERATORS:
            return argv[:index]
    return argv


#: the Celery apps a deployment runs: dermq's, and the callback worker's (worker.callbacks_app)
APPS = ("worker.celery_app", "worker.callbacks_app")


def _check_celery(args: list[str]) -> None:
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as cli

    from core.queueing import QUEUE_CALLBACKS, QUEUE_CASES, QUEUE_MAINTENANCE
    from worker.celery_app import app

    # the classification worker, beat and Flower run dermq's app; the callback worker its threaded form
    assert args[0] in ("-A", "--app") and args[1] in APPS, "celery runs dermq's app"
    subcommand, rest = args[2], args[3:]
    assert subcommand in ("worker", "beat", "inspect"), subcommand
    assert args[1] == "worker.celery_app" or subcommand == "worker", "only a worker runs the callback app"
    parent = click.Context(cli, info_name="celery", obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    params = cli.commands[subcommand].make_context(subcommand, list(rest), parent=parent).params
    if subcommand == "worker":
        # each worker reads the queues of its kind, and no other: a classification worker that took
        # callbacks waited on clinics' servers; a callback worker that took cases has no model
        expected = [QUEUE_CALLBACKS] if args[1] == "worker.callbacks_app" else [QUEUE_CASES, QUEUE_MAINTENANCE]
        assert sorted(params["queues"]) == sorted(expected), params["queues"]
        assert not {"-c", "--concurrency", "-P", "--pool"} & set(rest), "pool and concurrency come from Settings"
    if subcommand == "beat":
        assert params["schedule"].startswith("/var/lib/dermq/"), "beat's schedule lives on its state volume"
    if subcommand == "inspect":
        assert params["command"] == "ping" and params["destination"] == ["celery@$HOSTNAME"]


def _check_dermq(args: list[str]) -> None:
    """args name a command of the dermq CLI (not a group) and parse as its options and arguments;
    click raises UsageError otherwise."""
    from cli.main import dermq

    name: str | None = "dermq"
    command: click.Command = dermq
    context = click.Context(dermq, info_name=name)
    while isinstance(command, click.Group):
        assert args, f"`{context.command_path}` is a group of dermq commands, not a command"
        name, found, args = command.resolve_command(context, args)
        assert name is not None and found is not None
        command, context = found, click.Context(found, info_name=name, parent=context)
    command.make_context(name, args, parent=context.parent)


def check_command(argv: list[str]) -> None:
    argv = _simple_command(argv)
    program, args = argv[0], argv[1:]
    scripts = m.console_scripts()
    if program == "python":
        assert args[0] == "/opt/dermq/healthcheck.py" and args[1:] in (["api"], ["flower"]), argv
    elif program == "celery":
        _check_celery(args)
    elif program == "dermq":
        _check_dermq(args)
    else:
        assert program in scripts, f"{program} is neither a console script of pyproject.toml nor celery"
        assert not args, f"{program} takes its configuration from DERMQ_* settings, not arguments"


def test_commands_are_real_console_scripts_or_dermq_celery_commands() -> None:
    checked = 0
    for where, argv in _commands():
        try:
            check_command(argv)
        except (AssertionError, click.UsageError) as exc:
            pytest.fail(f"{where}: {shlex.join(argv)}: {exc}")
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    "argv",
    [
        ["dermq", "db", "migrate"],
        ["dermq", "db"],
        ["dermq", "db", "upgrade", "--to", "head"],
        ["dermq", "key", "create", "--role", "root"],
        ["dermq-apii"],
        ["celery", "-A", "worker.celery_app", "worker", "--queues", "cases"],
        ["celery", "-A", "worker.celery_app", "worker", "--queuez", "cases,maintenance"],
        ["celery", "-A", "worker.celery_app", "worker", "--queues", "cases,maintenance,callbacks"],
        ["celery", "-A", "worker.callbacks_app", "worker", "--queues", "cases,maintenance"],
        ["celery", "-A", "worker.callbacks_app", "beat"],
        ["celery", "-A", "worker.app", "beat"],
    ],
)
def test_the_command_check_catches_mistakes(argv: list[str]) -> None:
    with pytest.raises((AssertionError, click.UsageError, pytest.fail.Exception)):
        check_command(argv)


def test_the_migration_commands_exist() -> None:
    check_command(["dermq", "db", "upgrade"])
    check_command(["dermq", "db", "create"])


#: the Celery workers, which run from the worker image: the classification worker (the model) and the
#: callback worker (the same app on threads, which never loads it)
WORKER_COMMANDS = (["celery", "-A", "worker.celery_app", "worker"], ["celery", "-A", APPS[1], "worker"])


def test_each_process_runs_from_the_right_image() -> None:
    # Only the Celery workers run from the worker image (the classification worker loads the model;
    # the callback worker is the same app on threads); everything else runs from the API image,
    # which has no torch.
    callback_workers = 0
    for name, service in m.compose_services().items():
        kind = m.compose_image_kind(service)
        if kind is None:
            continue
        command = m.compose_command(service) or []
        expected = "worker" if command[:4] in WORKER_COMMANDS else "api"
        assert kind == expected, f"compose {name} runs from the {kind} image"
        assert service["image"].startswith(f"dermq-{kind}:")
        callback_workers += command[:4] == WORKER_COMMANDS[1]
    assert callback_workers == 1, "compose runs one callback worker"
    for w in m.workloads():
        for container in w.containers:
            expected = "dermq-worker" if w.component in ("worker", "callbacks") else "dermq-api"
            assert container["image"] == expected, f"{w.name} runs {container['image']}"
            if w.component == "callbacks":
                assert container["command"][:4] == WORKER_COMMANDS[1], f"{w.name} runs {container['command']}"


# --------------------------------------------------------------------------- secrets


PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
#: a password in a URL, with or without a user name (Redis URLs usually have none: redis://:<password>@)
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]*:([^@\s/'\"]+)@")
MODEL_PIN = re.compile(r"DERMQ_MODEL_SHA256:\s*([0-9a-f]{64})\b")
LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/]{40,}={0,2}(?![A-Za-z0-9+/_-])")


def _placeholder(value: str) -> bool:
    return "REPLACE_ME" in value or value in ("%s", "placeholder") or value.startswith(("<", "$"))


def test_no_secret_values_in_deployment_files() -> None:
    problems = []
    for path in deployment_files():
        text = path.read_text(errors="replace")
        where = path.relative_to(m.ROOT)
        if PRIVATE_KEY.search(text):
            problems.append(f"{where}: a private key")
        for password in URL_CREDENTIALS.findall(text):
            if not _placeholder(password):
                problems.append(f"{where}: a URL with a password ({password[:2]}...)")
        pins = set(MODEL_PIN.findall(text))  # a model manifest's SHA-256: public, and checked against the file
        for token in LONG_TOKEN.findall(text):
            if token not in pins:
                problems.append(f"{where}: a long token-like string ({token[:6]}...)")
    assert not problems, "\n".join(problems)


def test_the_secret_scan_would_catch_a_real_value() -> None:
    assert URL_CREDENTIALS.findall("postgresql+psycopg2://dermq:hunter2x@postgres:5432/dermq") == ["hunter2x"]
    assert URL_CREDENTIALS.findall("redis://:hunter2x@redis:6379/0") == ["hunter2x"]
    assert not _placeholder("hunter2x")
    assert LONG_TOKEN.findall('"kek-1": "q83vEjRWeJASNFZ4kBI0VniQEjRWeJASNFZ4kBI0VniQ="')


def test_secrets_never_travel_as_environment_variables() -> None:
    for name, service in m.compose_services().items():
        for key in m.compose_environment(service):
            if m.looks_secret(key):
                assert key.endswith("_FILE"), f"compose {name}: {key} must come from a secret file"
    for w in m.workloads():
        for container in w.containers:
            for key in m.container_environment(container):
                assert not m.looks_secret(key), f"k8s {w.name}: {key} must come from the Secret volume"
    for key in m.configmap_data():
        assert not m.looks_secret(key), f"ConfigMap carries {key}"


#: The modules that may read the Flower password: its setting, `dermq-flower`, and the local
#: development stack (`python -m core.devstack`, never deployed).
FLOWER_PASSWORD_READERS = {"core/config.py", "worker/flower.py", "core/devstack.py"}


def test_only_flower_reads_the_flower_password() -> None:
    # The deployment mounts dermq_flower_password into Flower alone (test_compose, test_k8s): that
    # holds while no other process asks for it. A new reader here needs the secret mounted there too.
    readers = set()
    for package in ("api", "core", "worker", "ml", "migrations"):
        for path in (m.ROOT / package).rglob("*.py"):
            if re.search(r"\bflower_password\b|require_flower_password|DERMQ_FLOWER_PASSWORD", path.read_text()):
                readers.add(path.relative_to(m.ROOT).as_posix())
    assert (
        "worker/flower.py" in readers and "require_flower_password()" in (m.ROOT / "worker" / "flower.py").read_text()
    )
    assert readers <= FLOWER_PASSWORD_READERS, (
        f"read the Flower password too: {sorted(readers - FLOWER_PASSWORD_READERS)}"
    )
