"""``make run``: the whole dermq stack on one machine, in the foreground.

Prepares what a fresh machine lacks (the database, its owner and runtime roles, the migrations run
as the owner, the encryption and audit signing key files, the demo clinic and key of :mod:`core.demo`, a Flower
password), then runs the API, a classification worker, a callback worker ("hooks"), Celery beat
and Flower as child processes with their logs interleaved, each line prefixed with its process name. The
services log in as the runtime role, which may only insert and read the audit tables. Ctrl-C
(or SIGTERM, or the terminal closing) stops them all: a warm shutdown first, so the running case
finishes, then a kill for anything still alive after the grace period. If one process dies, the others are stopped too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.config import ROOT, Settings
from core.cpus import usable_cpus
from core.settings_problems import settings_or_exit

COLOURS = {"api": "36", "worker": "32", "hooks": "34", "beat": "35", "flower": "33", "dermq": "1"}
GRACE_SECONDS = 30


def say(name: str, line: str) -> None:
    colour = COLOURS.get(name, "0")
    prefix = f"\033[{colour}m{name:<6}|\033[0m " if sys.stdout.isatty() else f"{name:<6}| "
    with contextlib.suppress(OSError):  # the terminal gone (closed, an SSH session dropped): stop all the same
        sys.stdout.write(prefix + line.rstrip("\n") + "\n")
        sys.stdout.flush()


def default_api_processes() -> int:
    """``make run``'s API processes: half the usable cores; the worker on this machine has the other half."""
    return max(1, usable_cpus() // 2)


def run_step(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)  # noqa: S603 - our own commands
    for line in (result.stdout + result.stderr).splitlines():
        say("dermq", line)
    if result.returncode != 0:
        raise SystemExit(f"make run: `{' '.join(args)}` failed with status {result.returncode}")


def flower_password(settings: Settings, state_dir: Path) -> str:
    configured = settings.flower_password.get_secret_value()
    if configured:
        return configured
    path = state_dir / "flower-password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(18) + "\n")
    return path.read_text().strip()


def _secret_file(path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24) + "\n")
    return path


def database_roles(settings: Settings, state_dir: Path) -> dict[str, str]:
    """The owner and runtime logins of the local database (core/db_roles.py): names, password files, URLs.

    DERMQ_DATABASE_URL stays the bootstrap login (it creates the database and the roles); migrations
    run as ``<db>_owner`` and every service as ``<db>_app``, over TCP with their own passwords.
    """
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    names = {"owner": f"{url.database}_owner", "runtime": f"{url.database}_app"}
    out: dict[str, str] = {}
    for kind, name in names.items():
        password_file = _secret_file(state_dir / f"db-{kind}-password")
        login = url.set(username=name, password=password_file.read_text().strip(), host=url.host or "127.0.0.1")
        out[kind], out[f"{kind}_password_file"] = name, str(password_file)
        out[f"{kind}_url"] = login.render_as_string(hide_password=False)
    return out


def prepare(settings: Settings, state_dir: Path, env: dict[str, str]) -> dict[str, str]:
    dermq = [sys.executable, "-m", "cli"]  # the `dermq` command of the sources being run
    state_dir.mkdir(parents=True, exist_ok=True)
    roles = database_roles(settings, state_dir)
    run_step([*dermq, "db", "create"], env)
    run_step(
        [
            *dermq,
            *("db", "roles", "--owner", roles["owner"], "--runtime", roles["runtime"]),
            *("--owner-password-file", roles["owner_password_file"]),
            *("--runtime-password-file", roles["runtime_password_file"]),
        ],
        env,
    )
    owner_env = {**env, "DERMQ_DATABASE_URL": roles["owner_url"], "DERMQ_DATABASE_RUNTIME_ROLE": roles["runtime"]}
    run_step([*dermq, "db", "upgrade"], owner_env)  # as the owner, then grants the runtime role
    env = {**env, "DERMQ_DATABASE_URL": roles["runtime_url"]}  # every service: the runtime role
    run_step([*dermq, "keys", "init"], env)
    run_step([*dermq, "demo", "--key-file", str(state_dir / "demo-key")], env)
    password = flower_password(settings, state_dir)
    say(
        "dermq",
        f"Flower: http://{settings.flower_host}:{settings.flower_port} (user {settings.flower_user}, "
        f"password in {state_dir / 'flower-password'} unless DERMQ_FLOWER_PASSWORD is set)",
    )
    say("dermq", f"API docs: http://{settings.api_host}:{settings.api_port}/docs")
    return {**env, "DERMQ_FLOWER_PASSWORD": password}


class Stack:
    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[str]] = {}
        self.stopping = threading.Event()

    def stop_on_signals(self) -> None:
        """Ctrl-C, SIGTERM, and the terminal closing (SIGHUP) stop the whole stack: its processes run
        in sessions of their own, which no terminal's hang-up reaches, and would outlive this one."""
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, self.stop)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        process = subprocess.Popen(  # noqa: S603 - our own commands
            args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.processes[name] = process
        threading.Thread(target=self._pump, args=(name, process), daemon=True).start()

    def _pump(self, name: str, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            say(name, line)

    def wait(self) -> int:
        while not self.stopping.is_set():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    say("dermq", f"{name} exited with status {process.returncode}; stopping the stack")
                    self.stop()
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self, *_args: object) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        say("dermq", "stopping: waiting for running work to finish (Ctrl-C again is not needed)")
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    # The main process only: it stops its children itself, and Celery's warm
                    # shutdown lets the running case finish (a group-wide SIGTERM would kill it).
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for name, process in self.processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say("dermq", f"{name} did not stop in {GRACE_SECONDS} s; killing it")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        say("dermq", "stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.devstack", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--state-dir",
        default=str(ROOT / "var"),
        help="local state: demo key, Flower password, beat schedule (the key file is DERMQ_KEY_FILE)",
    )
    args = parser.parse_args(argv)
    state_dir = Path(args.state_dir)
    # The stack on a developer's machine asks for development (private callback URLs allowed, a
    # generated Flower password); everything else defaults to production.
    os.environ.setdefault("DERMQ_ENVIRONMENT", "development")
    os.environ.setdefault("DERMQ_CALLBACK_ALLOW_PRIVATE_URLS", "true")  # a portal on this machine may listen
    os.environ.setdefault("DERMQ_API_PROCESSES", str(default_api_processes()))
    settings = settings_or_exit()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = prepare(settings, state_dir, env)
    bin_dir = Path(sys.executable).parent
    celery = [str(bin_dir / "celery"), "-A", "worker.celery_app"]
    stack = Stack()
    stack.stop_on_signals()
    stack.start("api", [str(bin_dir / "dermq-api")], env)
    stack.start(
        "worker",
        [
            *celery,
            "worker",
            "--queues",
            "cases,maintenance",
            "--loglevel",
            "INFO",
            "--hostname",
            "local@%h",
            "--without-mingle",
            "--without-gossip",
        ],
        env,
    )
    # Completion callbacks on a worker of their own (threads, no model), its metrics on a port and in a
    # metrics folder of its own
    metrics_port = settings.callback_worker_metrics_port
    hooks_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    stack.start(
        "hooks",
        [
            str(bin_dir / "celery"),
            *("-A", "worker.callbacks_app", "worker", "--queues", "callbacks", "--loglevel", "INFO"),
            *("--hostname", "callbacks@%h", "--without-mingle", "--without-gossip"),
        ],
        {**hooks_env, "DERMQ_WORKER_METRICS_PORT": str(metrics_port)},
    )
    stack.start(
        "beat", [*celery, "beat", "--loglevel", "INFO", "--schedule", str(state_dir / "celerybeat-schedule")], env
    )
    stack.start("flower", [str(bin_dir / "dermq-flower")], env)
    return stack.wait()


if __name__ == "__main__":
    raise SystemExit(main())
