"""docker-compose.yml against the users its containers run as: every named volume a dermq service
writes is a folder its image makes for that user, and deploy/secrets/README.md gives every secret
file to the group of the containers that read it (compose bind-mounts them with the host's owner
and mode, so a file the guide forgets stays unreadable and its service fails at start); and only
the callback worker, which sends the completion callbacks, gets a route out, and only through the
callbacks override (deploy/compose.callbacks.yml)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema

from tests.deploy import manifests as m

CALLBACKS_OVERRIDE = m.DEPLOY / "compose.callbacks.yml"
#: the group each image's processes run with (the user's own, and the same number, but for Redis's
#: Alpine image: user 999, group 1000), as deploy/secrets/README.md states them
DERMQ_UID = 10001
THIRD_PARTY_UIDS = {"postgres": 999, "nginxinc/nginx-unprivileged": 101, "redis": 1000}


def _folders_made_for_the_service_user(dockerfile: Path) -> set[str]:
    """Folders the final stage's ``install -d -o dermq`` commands create."""
    folders: set[str] = set()
    for instruction in m.final_stage(dockerfile, "RUN"):
        for command in instruction.args.split("&&"):
            words = shlex.split(command)
            if words[:2] != ["install", "-d"] or "-o" not in words or words[words.index("-o") + 1] != "dermq":
                continue
            options_end = max(words.index(flag) + 2 for flag in ("-o", "-g", "-m") if flag in words)
            folders.update(words[options_end:])
    return folders


def test_every_named_volume_of_a_dermq_service_is_a_folder_its_image_makes_for_the_service_user() -> None:
    # Docker gives a new named volume the owner and mode of the image's folder at the mount point, and
    # root's when the image has none: the non-root service could then not write to it (the audit
    # witness file, the period keys, beat's and Flower's state).
    for name, service in m.compose_services().items():
        kind = m.compose_image_kind(service)
        if kind is None:
            continue
        made = _folders_made_for_the_service_user(m.DOCKERFILES[kind])
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source in m.compose()["volumes"]:
                assert target in made, f"{name} mounts {source} at {target}, which {kind}'s image does not create"


def _uid(service: dict[str, Any]) -> int:
    if m.compose_image_kind(service) is not None:
        return DERMQ_UID
    return THIRD_PARTY_UIDS[service["image"].split(":")[0]]


def _permissions_commands() -> list[list[str]]:
    """The ``sudo chown`` and ``sudo chmod`` commands of the guide's "Permissions" section."""
    section = m.SECRETS_README.read_text().split("## Permissions", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith(("sudo chown", "sudo chmod"))]


def test_the_secrets_guide_gives_every_secret_file_to_the_group_of_the_containers_that_read_it() -> None:
    readers: dict[str, set[int]] = {}
    for service in m.compose_services().values():
        for entry in service.get("secrets") or []:
            source = entry if isinstance(entry, str) else entry["source"]
            readers.setdefault(Path(m.compose()["secrets"][source]["file"]).name, set()).add(_uid(service))
    owners: dict[str, str] = {}
    modes: dict[str, str] = {}
    for command, argument, *paths in _permissions_commands():
        for path in paths:
            (owners if command == "chown" else modes)[Path(path).name] = argument
    for name, uids in sorted(readers.items()):
        assert len(uids) == 1, f"{name} is read by containers of several users {uids}: give each its own file"
        (uid,) = uids
        assert owners.get(name) == f"root:{uid}", f"the guide must chown {name} to root:{uid}, not {owners.get(name)}"
        mode = modes.get(name)
        assert mode is not None and re.fullmatch(r"4[40]0|444", mode), f"{name}: chmod {mode}, not group-readable 440"


def test_the_permissions_check_reads_the_guide() -> None:
    commands = _permissions_commands()
    assert any(c[:2] == ["chown", "root:10001"] and "deploy/secrets/dermq-keys.json" in c for c in commands)
    assert any(c[0] == "chmod" and "deploy/secrets/dermq-keys.json" in c for c in commands)


def test_only_the_callback_worker_gets_a_route_out_and_only_with_the_callbacks_override(
    compose_schema: dict[str, Any],
) -> None:
    # The callback worker sends the completion callbacks; the classification workers, which decrypt
    # the images, stay on the internal network with the override as without it.
    base, override = m.compose(), m.load_yaml(CALLBACKS_OVERRIDE)
    errors = [e.message for e in jsonschema.Draft202012Validator(compose_schema).iter_errors(override)]
    assert not errors, errors
    workers = {name for name, service in base["services"].items() if _runs_celery_worker(service)}
    senders = {name for name in workers if (m.compose_command(base["services"][name]) or [])[2] == m.CALLBACKS_APP}
    assert workers == {"worker", "worker-cpu", "worker-callbacks"}
    assert senders == {"worker-callbacks"}
    assert set(override["services"]) == senders, "the override gives a route out to the callback worker alone"
    for name in senders:
        assert base["services"][name]["networks"] == ["backend"], name
        joined = set(override["services"][name]["networks"]) - {"backend"}
        assert joined and all(not override["networks"][n].get("internal") for n in joined), name
    assert not set(override["networks"]) & set(base["networks"]), "the override must not redefine base networks"


def _runs_celery_worker(service: dict[str, Any]) -> bool:
    return (m.compose_command(service) or [])[:1] == ["celery"] and "worker" in (m.compose_command(service) or [])
