"""Redis as compose runs it, from the files deploy/secrets/README.md's commands make: the guide's
Redis lines run as written in a folder, and a redis-server started with compose's command and that
folder in place of ``/run/secrets``, the services' user and password in its URL."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.deploy import manifests as m
from tests.faults.servers import RedisServer

#: the user the services' URL names (dermq_redis_url) and the operators' (redis-auth.conf alone)
SERVICES_USER, ADMIN_USER = "dermq", "admin"


def guide_redis_commands() -> str:
    """The lines of the secrets guide's "Creating them" block that make Redis's files: the password
    loop and the lines that read redis_password."""
    section = m.SECRETS_README.read_text().split("## Creating them", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL).group(1)  # type: ignore[union-attr]
    loop = re.search(r"^for f in .*?^done$", block, flags=re.DOTALL | re.MULTILINE).group(0)  # type: ignore[union-attr]
    made = [line for line in block.splitlines() if "redis_password" in line and not line.startswith("for ")]
    assert "redis_password" in loop and "redis_admin_password" in loop and len(made) == 2, made
    return "\n".join([loop, *made])


@dataclass(frozen=True)
class GuideFiles:
    folder: Path
    password: str  # the services' (redis_password)
    admin_password: str  # the operators' (redis_admin_password)
    config: Path  # redis-auth.conf, as compose mounts it


def make_guide_files(folder: Path) -> GuideFiles:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sh", "-euc", "umask 077\n" + guide_redis_commands()], cwd=folder, check=True)
    service = m.compose_services()["redis"]
    target = redis_include(service).removeprefix("/run/secrets/")
    (source,) = [e["source"] for e in service["secrets"] if isinstance(e, dict) and e["target"] == target]
    assert Path(m.compose()["secrets"][source]["file"]).name == target
    return GuideFiles(
        folder,
        (folder / "redis_password").read_text(),
        (folder / "redis_admin_password").read_text(),
        folder / target,
    )


def redis_include(service: dict) -> str:  # type: ignore[type-arg]
    command = m.compose_command(service) or []
    assert command[:1] == ["redis-server"] and "--include" in command, command
    return command[command.index("--include") + 1]


def compose_redis(files: GuideFiles, root: Path) -> RedisServer:
    """A redis-server (not started) with compose's command, the guide's files in place of
    ``/run/secrets``, its data in ``root``; its URL names the services' user and password."""
    command = m.compose_command(m.compose_services()["redis"]) or []
    options = [m.interpolate(part).replace("/run/secrets", str(files.folder)) for part in command[1:]]
    # compose's options last: their --appendonly wins over the class's own; the users come from the file
    return RedisServer(root, password=files.password, username=SERVICES_USER, options=[*options, "--dir", str(root)])
