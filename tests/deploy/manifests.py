"""Loading and reading the deployment files, for the tests in tests/deploy.

Everything here reads files of the working tree and installed packages only: no network, no
container engine, no cluster.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = {"api": DEPLOY / "Dockerfile.api", "worker": DEPLOY / "Dockerfile.worker"}
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS_CONF = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
SECRETS_README = DEPLOY / "secrets" / "README.md"

#: DERMQ_* variables that are not Settings fields but are read by core.config.get_settings itself.
NON_FIELD_VARIABLES = frozenset({"DERMQ_SECRETS_DIR"})
DERMQ_VARIABLE = re.compile(r"\bDERMQ_[A-Z0-9_]+\b")

#: The CA that signed the Postgres server's certificate, as every database client mounts it: the
#: shipped database URLs name it (sslmode=verify-full&sslrootcert=/run/secrets/postgres-ca.crt).
POSTGRES_CA = "postgres-ca.crt"

#: Placeholder contents for secret files when building Settings from a deployment's environment.
PLACEHOLDER_SECRETS = {
    "dermq_database_url": "postgresql+psycopg2://dermq:placeholder@postgres:5432/dermq"
    f"?sslmode=verify-full&sslrootcert=/run/secrets/{POSTGRES_CA}",
    "dermq_flower_password": "placeholder-flower-password",
    "dermq_redis_url": "redis://:placeholder-redis-password@redis:6379/0",
}

#: deploy/k8s: the namespace and the components (the pods' app.kubernetes.io/component label), and who
#: may reach the datastores (see networkpolicies.yaml for why beat and Flower differ). ``callbacks``
#: is the callback worker (worker.callbacks_app), the one component with a route out.
NAMESPACE = "dermq"
COMPONENTS = frozenset({"api", "worker", "callbacks", "beat", "flower", "migrate"})
POSTGRES_CLIENTS = frozenset({"api", "worker", "callbacks", "migrate"})
REDIS_CLIENTS = frozenset({"api", "worker", "callbacks", "beat", "flower"})
#: The callback worker's Celery app and command (its pool and threads come from Settings).
CALLBACKS_APP = "worker.callbacks_app"

FLOWER_PASSWORD, REDIS_URL = "dermq_flower_password", "dermq_redis_url"
#: Least privilege: the files under /run/secrets each dermq process reads, and so the only ones its
#: container may mount. Only `dermq-flower` asks for the Flower password
#: (Settings.require_flower_password); Redis's clients read its URL (with its password), beat nothing
#: else, and the migration job, which never opens Redis, not that. The database's clients read
#: POSTGRES_CA too (libpq, through the URL's sslrootcert). The callback worker reads the key file (a
#: callback secret is sealed under its KEK) but not the audit signing key (the sealer's, on the
#: classification workers' maintenance queue).
SECRETS_READ: dict[str, frozenset[str]] = {
    "migrate": frozenset({"dermq_database_url", POSTGRES_CA}),
    "api": frozenset({"dermq_database_url", REDIS_URL, POSTGRES_CA, "dermq-keys.json"}),
    "worker": frozenset(
        {"dermq_database_url", REDIS_URL, POSTGRES_CA, "dermq-keys.json", "dermq-audit-signing-key.json"}
    ),
    "callbacks": frozenset({"dermq_database_url", REDIS_URL, POSTGRES_CA, "dermq-keys.json"}),
    "beat": frozenset({REDIS_URL}),
    "flower": frozenset({FLOWER_PASSWORD, REDIS_URL}),
}


# --------------------------------------------------------------------------- project facts


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def console_scripts() -> dict[str, str]:
    return dict(pyproject()["project"]["scripts"])


def settings_variables() -> set[str]:
    from core.config import Settings

    return {f"DERMQ_{name.upper()}" for name in Settings.model_fields}


def secret_variables() -> set[str]:
    """DERMQ_* variables that carry secrets: SecretStr settings, and the connection URLs (they hold passwords)."""
    from pydantic import SecretStr

    from core.config import Settings

    secret = {"DERMQ_DATABASE_URL", "DERMQ_REDIS_URL"}
    for name, info in Settings.model_fields.items():
        if "SecretStr" in str(info.annotation) or info.annotation is SecretStr:
            secret.add(f"DERMQ_{name.upper()}")
    return secret


def looks_secret(variable: str) -> bool:
    return variable in secret_variables() or bool(re.search(r"PASSWORD|TOKEN|SECRET_KEY|PRIVATE_KEY|API_KEY", variable))


def process_of(command: list[str]) -> str:
    """Which dermq process a container command starts: a key of SECRETS_READ."""
    if command[:3] == ["dermq", "db", "upgrade"]:
        return "migrate"
    if command[:1] in (["dermq-api"], ["dermq-flower"]):
        return command[0].removeprefix("dermq-")
    if command[:3] == ["celery", "-A", "worker.celery_app"] and command[3:4] in (["worker"], ["beat"]):
        return command[3]
    if command[:4] == ["celery", "-A", CALLBACKS_APP, "worker"]:
        return "callbacks"
    raise AssertionError(f"not a dermq process: {command}")


def process_settings(env: dict[str, str], secrets_dir: Path) -> Any:
    """Settings as core.config.get_settings builds them in a container with environment env (already
    applied to os.environ) whose DERMQ_SECRETS_DIR holds what secrets_dir holds here."""
    from core.config import Settings

    if env.get("DERMQ_SECRETS_DIR"):
        return Settings(_secrets_dir=secrets_dir, _env_file=None)  # type: ignore[call-arg]
    return Settings(_env_file=None)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- YAML


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping, ``<<`` included, as Docker
    Compose v2.17 and later do (go-yaml v3): PyYAML keeps the last value, or merges every ``<<``."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=StrictLoader)


@cache
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def compose_services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """A compose value as compose would read it with none of the referenced variables set."""

    def default(match: re.Match[str]) -> str:
        return match.group(3) if match.group(2) in (":-", "-") else ""

    return _INTERPOLATION.sub(default, value)


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def compose_secret_targets(service: dict[str, Any]) -> set[str]:
    """File names under /run/secrets that compose mounts into the service."""
    targets = set()
    for entry in service.get("secrets") or []:
        if isinstance(entry, str):
            targets.add(entry)
        else:
            targets.add(entry.get("target") or entry["source"])
    return targets


def compose_command(service: dict[str, Any]) -> list[str] | None:
    command = service.get("command")
    if command is None:
        return None
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def compose_image_kind(service: dict[str, Any]) -> str | None:
    """'api' or 'worker' for services built from deploy/Dockerfile.*, None for third-party images."""
    build = service.get("build")
    if not build:
        return None
    dockerfile = (ROOT / build.get("context", ".") / build["dockerfile"]).resolve()
    for kind, path in DOCKERFILES.items():
        if dockerfile == path.resolve():
            return kind
    raise AssertionError(f"service builds from an unknown Dockerfile {dockerfile}")


@cache
def k8s_documents() -> tuple[tuple[Path, dict[str, Any]], ...]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=StrictLoader):
            if doc is not None:
                docs.append((path, doc))
    return tuple(docs)


def k8s_objects(kind: str | None = None) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if kind is None or doc["kind"] == kind]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in k8s_objects(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


@dataclass
class Workload:
    """A Deployment or Job and its pod template."""

    kind: str
    name: str
    component: str
    obj: dict[str, Any]
    pod: dict[str, Any] = field(repr=False)
    labels: dict[str, str] = field(repr=False)

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.pod["containers"]


def workloads() -> list[Workload]:
    found = []
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            template = obj["spec"]["template"]
            labels = template["metadata"]["labels"]
            found.append(
                Workload(
                    obj["kind"],
                    obj["metadata"]["name"],
                    labels["app.kubernetes.io/component"],
                    obj,
                    template["spec"],
                    labels,
                )
            )
    return found


def workload(component: str) -> Workload:
    matches = [w for w in workloads() if w.component == component]
    assert len(matches) == 1, f"expected one workload for component {component}, found {len(matches)}"
    return matches[0]


def configmap_data() -> dict[str, str]:
    return {key: str(value) for key, value in k8s_object("ConfigMap", "dermq-config")["data"].items()}


def container_environment(container: dict[str, Any]) -> dict[str, str]:
    """ConfigMap variables (envFrom) overlaid by the container's own env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update({k: str(v) for k, v in k8s_object("ConfigMap", name)["data"].items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def mounted_secret_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Path of each Secret key that the container sees as a file -> 'secret/key'."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        sources = []
        if "secret" in volume:
            sources.append(volume["secret"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                sources.append(source["secret"])
        for secret in sources:
            name = secret.get("secretName") or secret.get("name")
            for item in secret.get("items", []):
                files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = f"{name}/{item['key']}"
    return files


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: int(port["containerPort"]) for port in container.get("ports", []) if "name" in port}


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped; stage counts FROMs (0-based)."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    instructions = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip()))
    return instructions


def parse_env_instruction(args: str) -> dict[str, str]:
    parts = shlex.split(args)
    if parts and "=" not in parts[0]:  # legacy form: ENV KEY value
        return {parts[0]: " ".join(parts[1:])}
    return dict(part.split("=", 1) for part in parts)


def final_stage(path: Path, keyword: str) -> list[Instruction]:
    """The final stage's ``keyword`` instructions (what builds the image that runs)."""
    instructions = dockerfile_instructions(path)
    final = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == final and i.keyword == keyword]


def dockerfile_runtime_env(path: Path) -> dict[str, str]:
    """ENV of the final stage (what the running container starts with)."""
    env: dict[str, str] = {}
    for instruction in final_stage(path, "ENV"):
        env.update(parse_env_instruction(instruction.args))
    return env


def exec_form(args: str) -> list[str] | None:
    """The JSON exec form of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
    import json

    args = args.strip()
    if args.startswith("["):
        return [str(part) for part in json.loads(args)]
    return None
