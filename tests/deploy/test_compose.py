"""docker-compose.yml: valid Compose, the services and their order, ports, secrets (each service
mounts exactly those its process reads: the Flower password only Flower), and that every dermq
service starts with settings that production accepts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy import manifests as m
from tests.deploy import nginx_conf

DERMQ_SERVICES = ("migrate", "api", "worker", "worker-cpu", "worker-callbacks", "beat", "flower")


def test_compose_file_follows_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(m.compose())]
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_a_misspelt_key(compose_schema: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(m.compose()))
    broken["services"]["api"]["depend_on"] = broken["services"]["api"].pop("depends_on")
    assert not jsonschema.Draft202012Validator(compose_schema).is_valid(broken)


def test_a_key_given_twice_in_a_mapping_is_refused_as_compose_refuses_it(tmp_path: Path) -> None:
    # Compose v2.17+ rejects two `<<` merge keys in one mapping; PyYAML alone would merge both
    twice = tmp_path / "twice.yml"
    twice.write_text("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="given twice"):
        m.load_yaml(twice)
    once = tmp_path / "once.yml"
    once.write_text("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: [*a, *b]\n  z: 3\n")
    assert m.load_yaml(once)["c"] == {"x": 1, "y": 2, "z": 3}


def test_references_between_services_volumes_networks_and_secrets_resolve() -> None:
    doc = m.compose()
    services = doc["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for network in service.get("networks") or []:
            assert network in doc["networks"], f"{name} joins unknown network {network}"
        for entry in service.get("secrets") or []:
            source = entry if isinstance(entry, str) else entry["source"]
            assert source in doc["secrets"], f"{name} mounts unknown secret {source}"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in doc["volumes"], f"{name} mounts unknown volume {source}"
            else:
                assert (m.ROOT / source).exists(), f"{name} bind-mounts {source}, which is not in the repository"


def test_only_nginx_publishes_ports_443_and_80() -> None:
    published = {name: service["ports"] for name, service in m.compose_services().items() if service.get("ports")}
    assert set(published) == {"nginx"}, f"only nginx may publish ports, found {sorted(published)}"
    host_ports = {str(port).split(":")[-2] for port in published["nginx"]}
    assert host_ports == {"443", "80"}


def test_nginx_publishes_the_ports_its_configuration_listens_on() -> None:
    conf = nginx_conf.parse_nginx(m.NGINX_CONF.read_text())
    http = conf.find("http")[0]
    listening = {d.args[0].rsplit(":", 1)[-1] for server in http.find("server") for d in server.find("listen")}
    container_ports = {str(port).split(":")[-1] for port in m.compose_services()["nginx"]["ports"]}
    assert container_ports <= listening, f"compose maps to {container_ports}, nginx listens on {listening}"


def test_postgres_keeps_its_data_in_a_named_volume_and_has_a_health_check() -> None:
    postgres = m.compose_services()["postgres"]
    data_volumes = [v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert data_volumes and data_volumes[0].split(":")[0] in m.compose()["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "POSTGRES_PASSWORD" not in postgres["environment"], "the password comes from POSTGRES_PASSWORD_FILE"
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


def test_redis_runs_with_the_append_only_file_and_never_evicts() -> None:
    command = " ".join(m.compose_command(m.compose_services()["redis"]) or [])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert m.compose_services()["redis"].get("healthcheck")
    # noeviction acts only with a maxmemory, and the memory alert divides by it (0 without: never fires);
    # the container's own limit sits above it (the AOF rewrite's copy)
    maxmemory = re.search(r"--maxmemory \$\{REDIS_MAXMEMORY:-(\d+)gb\}", command)
    limit = re.fullmatch(r"\$\{REDIS_MEM_LIMIT:-(\d+)g\}", str(m.compose_services()["redis"].get("mem_limit")))
    assert maxmemory and limit and int(limit.group(1)) > int(maxmemory.group(1))


def test_api_and_workers_wait_for_the_migration_job() -> None:
    services = m.compose_services()
    assert m.compose_command(services["migrate"]) == ["dermq", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "worker-cpu", "worker-callbacks"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_gpu_worker_reserves_an_nvidia_gpu_and_the_cpu_worker_is_a_profile() -> None:
    services = m.compose_services()
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "profiles" not in services["worker"]
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "devices" not in cpu.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert m.compose_environment(cpu)["DERMQ_DEVICE"] == "cpu"
    assert m.compose_command(cpu) == m.compose_command(services["worker"])
    # its children follow its CPU limit (core.cpus): without one, a child per core of a large host
    assert re.fullmatch(r"\$\{CPU_WORKER_CPUS:-\d+\}", str(cpu.get("cpus")))
    assert m.compose_environment(services["worker"]).get("DERMQ_WORKER_THREADS")


def test_the_callback_worker_starts_by_default_on_threads_without_the_model_or_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = m.compose_services()["worker-callbacks"]
    assert m.compose_image_kind(service) == "worker"
    assert m.compose_command(service) == ["celery", "-A", m.CALLBACKS_APP, "worker", "--queues", "callbacks"]
    assert "profiles" not in service, "callbacks are a core feature: the callback worker starts with the stack"
    assert not {"deploy", "devices", "gpus", "runtime"} & set(service), "the callback worker never gets the GPU"
    # it waits on the network, not on a core: a small share of the host, which its threads do not follow
    assert 0 < float(service["cpus"]) <= 1 and re.fullmatch(r"\d+m", service["mem_limit"])
    # neither the period keys (no case's blob can be opened there) nor the audit witness (no sealer)
    assert not service.get("volumes"), "the callback worker mounts no volume"
    settings, env = _service_settings("worker-callbacks", tmp_path, monkeypatch)
    assert settings.callback_worker_threads == int(env["DERMQ_CALLBACK_WORKER_THREADS"])
    assert settings.metrics_host == "0.0.0.0"
    assert str(settings.worker_metrics_port) in service["expose"]


def test_exactly_one_beat() -> None:
    beats = [
        name for name, service in m.compose_services().items() if (m.compose_command(service) or [])[3:4] == ["beat"]
    ]
    assert beats == ["beat"]
    assert m.compose_services()["beat"]["deploy"]["replicas"] == 1


def test_metrics_and_internal_services_stay_on_the_internal_network() -> None:
    doc = m.compose()
    assert doc["networks"]["backend"].get("internal") is True
    for name in (
        "postgres",
        "redis",
        "worker",
        "worker-cpu",
        "worker-callbacks",
        "beat",
        "flower",
        "prometheus",
        "migrate",
    ):
        assert doc["services"][name]["networks"] == ["backend"], name
    assert set(doc["services"]["api"]["networks"]) == {"edge", "backend"}
    assert set(doc["services"]["nginx"]["networks"]) == {"edge", "public"}


def test_only_nginx_has_a_route_out() -> None:
    # A network that is not internal routes to the outside world; in the base file only nginx may
    # join one (its published ports need it). deploy/compose.callbacks.yml adds one for the workers.
    doc = m.compose()
    defined = doc.get("networks") or {}
    for name, service in doc["services"].items():
        networks = service.get("networks") or ["default"]  # no networks: compose's default, not internal
        routed = [n for n in networks if not (defined.get(n) or {}).get("internal")]
        if name == "nginx":
            assert routed == ["public"], "nginx publishes its ports from one non-internal network"
        else:
            assert not routed, f"{name} joins {routed}, which are not internal"


def test_third_party_images_are_pinned() -> None:
    for name, service in m.compose_services().items():
        if m.compose_image_kind(service) is None:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin a version, not {image}"


def test_dermq_services_are_hardened() -> None:
    for name in DERMQ_SERVICES:
        service = m.compose_services()[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "user" not in service, f"{name}: the image's non-root user must not be overridden"


def test_secret_files_are_not_in_the_repository_and_git_ignores_them() -> None:
    secrets_dir = m.DEPLOY / "secrets"
    ignore = (secrets_dir / ".gitignore").read_text().split()
    assert "*" in ignore
    for name, secret in m.compose()["secrets"].items():
        path = (m.ROOT / secret["file"]).resolve()
        assert path.parent == secrets_dir.resolve(), f"secret {name} must live in deploy/secrets/"
        assert "environment" not in secret, f"secret {name} must be a file"


def _service_settings(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Settings as the service's process would build them: image ENV, compose environment, secret files."""
    service = m.compose_services()[name]
    env = {**m.dockerfile_runtime_env(m.DOCKERFILES[m.compose_image_kind(service)]), **m.compose_environment(service)}
    secrets_dir = tmp_path / name
    secrets_dir.mkdir()
    targets = m.compose_secret_targets(service)
    for target in targets:
        (secrets_dir / target).write_text(m.PLACEHOLDER_SECRETS.get(target, "placeholder"))
    for key in [k for k in os.environ if k.startswith("DERMQ_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("DERMQ_"):
            monkeypatch.setenv(key, value)
    if targets:
        assert env.get("DERMQ_SECRETS_DIR") == "/run/secrets", f"{name}: secrets are read from /run/secrets"
    else:
        # Nothing mounted, so no /run/secrets: a secrets dir there would warn at every start.
        assert not env.get("DERMQ_SECRETS_DIR"), f"{name} mounts no secret: empty its DERMQ_SECRETS_DIR"
    return m.process_settings(env, secrets_dir), env


@pytest.mark.parametrize("name", DERMQ_SERVICES)
def test_each_dermq_service_starts_with_valid_production_settings(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, env = _service_settings(name, tmp_path, monkeypatch)
    assert settings.environment == "production"
    process = m.process_of(m.compose_command(m.compose_services()[name]) or [])
    targets = m.compose_secret_targets(m.compose_services()[name])
    for target in targets:
        if target.startswith("dermq_"):
            field = target.removeprefix("dermq_")
            assert f"DERMQ_{field.upper()}" in m.settings_variables(), f"{name}: secret {target} names no setting"
    assert targets == m.SECRETS_READ[process], f"{name} ({process}) must mount exactly {set(m.SECRETS_READ[process])}"
    if "dermq_database_url" in targets:
        assert settings.database_url == m.PLACEHOLDER_SECRETS["dermq_database_url"]
    if "dermq-keys.json" in targets:
        assert settings.key_file is not None and settings.key_file.parent == Path("/run/secrets")
        assert settings.key_file.name in targets, f"{name} reads {settings.key_file} but compose does not mount it"
    if process == "flower":
        assert settings.require_flower_password() == m.PLACEHOLDER_SECRETS[m.FLOWER_PASSWORD]
    else:
        assert not settings.flower_password.get_secret_value(), f"{name} must not see the Flower password"
    for forbidden in sorted(m.secret_variables()):
        assert forbidden not in env, f"{name}: {forbidden} is a secret, supply it as a file"


def test_only_flower_gets_the_flower_password() -> None:
    # Any service at all, dermq's or not: the Flower password is mounted into Flower and nowhere else.
    holders = {name for name, s in m.compose_services().items() if m.FLOWER_PASSWORD in m.compose_secret_targets(s)}
    assert holders == {"flower"}, (
        f"only Flower reads the Flower password; also mounted in {sorted(holders - {'flower'})}"
    )
    assert m.process_of(m.compose_command(m.compose_services()["flower"]) or []) == "flower"


def test_flower_refuses_to_start_without_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The mount is what supplies it: without the file, dermq-flower refuses to serve.
    _, env = _service_settings("flower", tmp_path, monkeypatch)
    (tmp_path / "flower" / m.FLOWER_PASSWORD).unlink()
    with pytest.raises(ValueError, match="DERMQ_FLOWER_PASSWORD"):
        m.process_settings(env, tmp_path / "flower").require_flower_password()


def test_container_listeners_bind_all_interfaces_and_match_the_ports_others_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, _ = _service_settings("api", tmp_path, monkeypatch)
    assert api.api_host == "0.0.0.0" and api.metrics_host == "0.0.0.0"
    nginx_address = m.compose_services()["nginx"]["networks"]["edge"]["ipv4_address"]
    assert api.forwarded_allow_ips == [nginx_address], "the API believes X-Forwarded-For from nginx alone"
    assert {str(api.api_port), str(api.metrics_port)} <= set(m.compose_services()["api"]["expose"])
    upstreams = [
        d.args[0]
        for d in nginx_conf.parse_nginx(m.NGINX_CONF.read_text()).walk()
        if d.name == "server" and d.args and ":" in d.args[0] and not d.block
    ]
    assert f"api:{api.api_port}" in upstreams, f"nginx upstream {upstreams} must point at api:{api.api_port}"

    worker, _ = _service_settings("worker", tmp_path, monkeypatch)
    assert worker.metrics_host == "0.0.0.0"
    assert str(worker.worker_metrics_port) in m.compose_services()["worker"]["expose"]

    flower, _ = _service_settings("flower", tmp_path, monkeypatch)
    assert flower.flower_host == "0.0.0.0"
    assert flower.flower_state_file is not None
    assert any(v.endswith(f":{flower.flower_state_file.parent}") for v in m.compose_services()["flower"]["volumes"])


def _stop_grace_seconds(service: str) -> int:
    """A service's stop_grace_period in seconds; Docker's default, 10 s, where none is set."""
    grace = m.compose_services()[service].get("stop_grace_period", "10s")
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, f"{service}: write stop_grace_period in seconds (45s), not {grace}"
    return int(match.group(1))


def test_worker_stop_grace_period_outlasts_the_task_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = _service_settings("worker", tmp_path, monkeypatch)
    for worker in ("worker", "worker-cpu"):
        assert _stop_grace_seconds(worker) > settings.task_time_limit, worker


def test_callback_worker_stop_grace_period_outlasts_an_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery's warm shutdown lets the attempts under way end: each within three timeouts, plus its record
    from core.config import CALLBACK_RECORD_SECONDS

    settings, _ = _service_settings("worker-callbacks", tmp_path, monkeypatch)
    attempt = 3 * settings.callback_timeout_seconds + CALLBACK_RECORD_SECONDS
    assert _stop_grace_seconds("worker-callbacks") > attempt


def test_api_stop_grace_period_outlasts_the_longest_long_poll() -> None:
    # Stopped, the API finishes the requests in flight, long polls included, with a margin (as in
    # deploy/k8s/api.yaml, less the preStop pause: compose has no load balancer to drain).
    from api.waiters import MAX_WAIT_SECONDS

    assert _stop_grace_seconds("api") >= MAX_WAIT_SECONDS + 10


def test_beat_schedule_file_is_on_a_volume() -> None:
    beat = m.compose_services()["beat"]
    command = m.compose_command(beat) or []
    schedule = Path(command[command.index("--schedule") + 1])
    assert any(v.endswith(f":{schedule.parent}") for v in beat["volumes"]), "beat's schedule must survive restarts"


def test_the_api_runs_several_processes_the_operator_may_change() -> None:
    # more than one by default (the host's worker has cores of its own), and set from the host's environment
    processes = m.compose_services()["api"]["environment"]["DERMQ_API_PROCESSES"]
    assert processes == "${DERMQ_API_PROCESSES:-2}"
