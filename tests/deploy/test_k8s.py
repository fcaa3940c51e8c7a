"""deploy/k8s: every manifest is valid Kubernetes, the pieces refer to each other correctly, the
pods are locked down and mount only their secrets (network policies: test_k8s_network; KEDA:
test_k8s_keda)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from tests.deploy import manifests as m
from tests.deploy import nginx_conf

#: The oldest Kubernetes we support, and the newest the installed schemas know.
K8S_VERSIONS = ("1.30", latest_version())
CRD_API_GROUPS = ("keda.sh/", "kustomize.config.k8s.io/")


def _schema_checked() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in m.k8s_documents() if not d["apiVersion"].startswith(CRD_API_GROUPS)]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    errors = []
    for path, doc in _schema_checked():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.relative_to(m.ROOT)} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)
    assert len(_schema_checked()) >= 20


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(m.k8s_object("Deployment", "dermq-api"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_every_object_is_namespaced_to_dermq_and_listed_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for kustomization in (m.K8S / "kustomization.yaml", m.K8S / "migrate" / "kustomization.yaml"):
        doc = m.load_yaml(kustomization)
        assert doc["namespace"] == m.NAMESPACE
        for resource in doc["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.is_file(), f"{kustomization}: {resource} does not exist"
            listed.add(path)
    for path, doc in m.k8s_documents():
        if doc["kind"] in ("Kustomization", "Namespace"):
            continue
        assert doc["metadata"].get("namespace") == m.NAMESPACE, f"{path}: {doc['kind']} outside {m.NAMESPACE}"
    manifests = {p.resolve() for p, d in m.k8s_documents() if d["kind"] != "Kustomization"}
    templates = {p for p in manifests if p.parent.name == "secrets"}
    assert manifests - templates == listed, "every manifest but the Secret templates belongs to a kustomization"
    assert not templates & listed, "Secret templates must never be applied as they are"


def test_both_kustomizations_deploy_the_same_images() -> None:
    main = m.load_yaml(m.K8S / "kustomization.yaml")["images"]
    migrate = m.load_yaml(m.K8S / "migrate" / "kustomization.yaml")["images"]
    assert main == migrate
    for image in main:
        assert image["newTag"] not in ("", "latest")
    names = {image["name"] for image in main}
    for w in m.workloads():
        for container in w.containers:
            assert container["image"] in names, f"{w.name}: image {container['image']} is not mapped by kustomize"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", ["", "migrate"])
def test_kustomize_builds(folder: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(m.K8S / folder)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_workloads_are_the_expected_components_with_matching_selectors() -> None:
    found = {w.component: w for w in m.workloads()}
    assert set(found) == m.COMPONENTS
    assert found["migrate"].kind == "Job"
    for w in found.values():
        assert w.labels["app.kubernetes.io/part-of"] == "dermq"
        if w.kind == "Deployment":
            assert m.selector_matches(w.obj["spec"]["selector"], w.labels), w.name


def test_beat_is_a_single_replica_that_is_recreated() -> None:
    beat = m.workload("beat").obj["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"


def test_gpu_worker_requests_a_gpu_on_gpu_nodes() -> None:
    worker = m.workload("worker")
    (container,) = worker.containers
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert worker.pod["nodeSelector"], "the GPU worker must be pinned to GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in worker.pod["tolerations"])


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for w in m.workloads():
        pod_security = w.pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True, w.name
        assert pod_security["runAsUser"] != 0, w.name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", w.name
        assert w.pod["automountServiceAccountToken"] is False, w.name
        for container in w.containers:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, w.name
            assert security["readOnlyRootFilesystem"] is True, w.name
            assert security["capabilities"]["drop"] == ["ALL"], w.name
            assert "add" not in security["capabilities"], w.name
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{w.name}: a read-only root filesystem needs a writable /tmp"


def test_every_container_has_resource_requests_and_limits() -> None:
    for w in m.workloads():
        for container in w.containers:
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{w.name}: {kind} need cpu and memory"


def test_long_running_components_have_probes_on_ports_they_declare() -> None:
    for component in ("api", "worker", "callbacks", "flower"):
        (container,) = m.workload(component).containers
        assert "livenessProbe" in container, component
        ports = m.named_ports(container)
        for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = container.get(probe_name)
            if probe is None:
                continue
            handler = probe.get("httpGet") or probe.get("tcpSocket")
            if handler is not None:
                port = handler["port"]
                assert port in ports or port in ports.values(), (
                    f"{component} {probe_name} probes undeclared port {port}"
                )
    api = m.workload("api").containers[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness must not depend on Postgres or Redis"


def test_ports_agree_with_the_settings_the_pods_run_with() -> None:
    for component, port_settings in {
        "api": {"http": "DERMQ_API_PORT", "metrics": "DERMQ_METRICS_PORT"},
        "worker": {"metrics": "DERMQ_WORKER_METRICS_PORT"},
        "callbacks": {"metrics": "DERMQ_WORKER_METRICS_PORT"},
        "flower": {"http": "DERMQ_FLOWER_PORT"},
    }.items():
        w = m.workload(component)
        (container,) = w.containers
        env = m.container_environment(container)
        ports = m.named_ports(container)
        for port_name, variable in port_settings.items():
            assert ports[port_name] == int(env[variable]), f"{component}: port {port_name} != {variable}"
        annotations = w.obj["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            metrics_port = ports.get("metrics", ports.get("http"))
            assert int(annotations["prometheus.io/port"]) == metrics_port, (
                f"{component}: Prometheus scrapes a wrong port"
            )


def test_services_and_ingress_route_to_declared_ports() -> None:
    services = {s["metadata"]["name"]: s for s in m.k8s_objects("Service")}
    workloads = m.workloads()
    for name, service in services.items():
        targets = [
            w
            for w in workloads
            if w.kind == "Deployment" and m.selector_matches({"matchLabels": service["spec"]["selector"]}, w.labels)
        ]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} Deployments"
        ports = m.named_ports(targets[0].containers[0])
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"Service {name} targets undeclared port {target}"
            assert target != "metrics" and target != ports.get("metrics"), f"Service {name} must not expose metrics"
    ingress = m.k8s_object("Ingress", "dermq")
    assert ingress["spec"]["tls"], "the Ingress terminates TLS"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = services[backend["name"]]
            assert backend["port"].get("name") in {p["name"] for p in service["spec"]["ports"]}
            assert backend["name"] == "dermq-api", "only the API is public"


def test_ingress_streams_uploads_and_allows_the_api_upload_cap() -> None:
    from api.upload import FORM_OVERHEAD
    from core.config import Settings

    annotations = m.k8s_object("Ingress", "dermq")["metadata"]["annotations"]
    body = nginx_conf.nginx_size(annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
    api_cap = Settings.model_fields["max_upload_bytes"].default + FORM_OVERHEAD
    assert api_cap <= body <= api_cap + 2 * 1024 * 1024
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # no answer in a temporary file
    assert annotations["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"


def test_pod_disruption_budgets_cover_api_and_the_workers() -> None:
    covered = set()
    for pdb in m.k8s_objects("PodDisruptionBudget"):
        matched = [w for w in m.workloads() if m.selector_matches(pdb["spec"]["selector"], w.labels)]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {len(matched)} workloads"
        covered.add(matched[0].component)
    assert covered == {"api", "worker", "callbacks"}
    for name in ("dermq-worker", "dermq-worker-callbacks"):
        pdb = m.k8s_object("PodDisruptionBudget", name)["spec"]
        assert "maxUnavailable" in pdb, f"{name}: minAvailable would block node drains with a single worker"


def test_worker_termination_grace_outlasts_the_task_time_limit() -> None:
    from core.config import Settings

    grace = m.workload("worker").pod["terminationGracePeriodSeconds"]
    env = m.container_environment(m.workload("worker").containers[0])
    limit = float(env.get("DERMQ_TASK_TIME_LIMIT", Settings.model_fields["task_time_limit"].default))
    assert grace > limit


@pytest.mark.parametrize("component", sorted(m.COMPONENTS))
def test_each_pod_starts_with_valid_production_settings(
    component: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = m.workload(component)
    (container,) = w.containers
    env = m.container_environment(container)
    secrets_dir = env["DERMQ_SECRETS_DIR"]
    files = m.mounted_secret_files(w.pod, container)
    local = tmp_path / "secrets"
    local.mkdir()
    names = set()
    for path in files:
        assert secrets_dir and path.startswith(secrets_dir + "/"), f"{component}: {path} outside DERMQ_SECRETS_DIR"
        name = path.removeprefix(secrets_dir + "/")
        names.add(name)
        (local / name).write_text(m.PLACEHOLDER_SECRETS.get(name, "placeholder"))
        if name.startswith("dermq_"):
            assert f"DERMQ_{name.removeprefix('dermq_').upper()}" in m.settings_variables(), f"{name} names no setting"
    mounts = {mount["mountPath"].rstrip("/") for mount in container["volumeMounts"]}
    if secrets_dir:
        assert secrets_dir in mounts, f"{component}: nothing mounted at DERMQ_SECRETS_DIR, which then warns at start"
    for key in [k for k in os.environ if k.startswith("DERMQ_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("DERMQ_"):
            monkeypatch.setenv(key, value)
    settings = m.process_settings(env, local)
    assert settings.environment == "production"

    process = m.process_of(container["command"])
    assert process == component, f"{w.name} runs {container['command']}"
    assert names == m.SECRETS_READ[process], f"{component} must mount exactly {set(m.SECRETS_READ[process])}"
    if component in m.POSTGRES_CLIENTS:
        assert f"{secrets_dir}/dermq_database_url" in files, f"{component} needs the database URL"
    if component in ("api", "worker", "callbacks"):
        assert str(settings.key_file) in files, f"{component} reads {settings.key_file}, which is not mounted"
    if process == "flower":
        assert settings.require_flower_password() == m.PLACEHOLDER_SECRETS[m.FLOWER_PASSWORD]
    else:
        assert not settings.flower_password.get_secret_value(), f"{component} must not see the Flower password"
    for variable in sorted(m.secret_variables()):
        assert variable not in env, f"{component}: {variable} is a secret; mount it as a file"


def test_only_the_flower_pod_mounts_the_flower_password() -> None:
    holders = {
        w.component
        for w in m.workloads()
        for container in [*w.containers, *w.pod.get("initContainers", [])]
        if any(ref.endswith(f"/{m.FLOWER_PASSWORD}") for ref in m.mounted_secret_files(w.pod, container).values())
    }
    assert holders == {"flower"}, (
        f"only Flower reads the Flower password; also mounted in {sorted(holders - {'flower'})}"
    )
    # Nor may a pod reach it by another route: an env var from the Secret, or the whole Secret as a volume.
    for w in m.workloads():
        if w.component == "flower":
            continue
        for container in [*w.containers, *w.pod.get("initContainers", [])]:
            for item in container.get("env", []):
                key = item.get("valueFrom", {}).get("secretKeyRef", {}).get("key")
                assert key != m.FLOWER_PASSWORD, f"{w.name}: {item['name']} carries the Flower password"
            for source in container.get("envFrom", []):
                assert "secretRef" not in source, f"{w.name}: envFrom a Secret exposes every key of it"
        for volume in w.pod.get("volumes", []):
            secrets = [volume.get("secret")] + [s.get("secret") for s in volume.get("projected", {}).get("sources", [])]
            for secret in filter(None, secrets):
                assert secret.get("items"), f"{w.name}: volume {volume['name']} mounts every key of its Secret"


def test_listeners_bind_all_interfaces_in_pods() -> None:
    env = m.configmap_data()
    for variable in ("DERMQ_API_HOST", "DERMQ_METRICS_HOST", "DERMQ_FLOWER_HOST"):
        assert env[variable] == "0.0.0.0", variable
    proxies = json.loads(env["DERMQ_FORWARDED_ALLOW_IPS"])
    assert proxies and "*" not in proxies, "forwarded headers are believed from the ingress network only"


# --------------------------------------------------------------------------- Secrets


def test_secret_manifests_are_templates_with_placeholders_only() -> None:
    secrets = [(p, d) for p, d in m.k8s_documents() if d["kind"] == "Secret"]
    names = {"dermq-secrets", "dermq-keys", "dermq-tls", "dermq-postgres-ca", "dermq-redis"}
    assert {d["metadata"]["name"] for _, d in secrets} == names
    for path, doc in secrets:
        assert path.name.endswith(".template.yaml"), path
        assert "data" not in doc, f"{path}: base64 data hides real values; templates use stringData placeholders"
        for key, value in doc["stringData"].items():
            assert "REPLACE_ME" in value, f"{path}: {key} is not a placeholder"


def _readme_secrets() -> dict[str, set[str]]:
    """The keys of each generic Secret that deploy/README.md's `kubectl create secret generic` lines create."""
    text = (m.ROOT / "deploy" / "README.md").read_text().replace("\\\n", " ")
    created: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["kubectl"] and "generic" in words and "secret" in words:
            name = words[words.index("generic") + 1]
            keys = {w.split("=", 2)[1] for w in words if w.startswith("--from-file=")}
            created.setdefault(name, set()).update(keys)
    return created


def test_the_readme_creates_every_secret_key_the_pods_mount() -> None:
    # a projected key missing from its Secret leaves the pod in ContainerCreating
    created = _readme_secrets()
    assert {"dermq-secrets", "dermq-keys", "dermq-postgres-ca"} <= set(created), created
    for w in m.workloads():
        for container in w.containers:
            for reference in m.mounted_secret_files(w.pod, container).values():
                secret, key = reference.split("/", 1)
                if secret in created:  # the TLS Secret is made by `kubectl create secret tls`
                    assert key in created[secret], f"{w.name} mounts {secret}/{key}; deploy/README.md never creates it"


def test_secret_templates_carry_the_keys_the_pods_mount() -> None:
    templates = {d["metadata"]["name"]: set(d["stringData"]) for d in m.k8s_objects("Secret")}
    for w in m.workloads():
        for container in w.containers:
            for reference in m.mounted_secret_files(w.pod, container).values():
                secret, key = reference.split("/", 1)
                assert key in templates[secret], f"{w.name} mounts {secret}/{key}, missing from the template"
    ingress = m.k8s_object("Ingress", "dermq")
    for tls in ingress["spec"]["tls"]:
        assert tls["secretName"] in templates


def test_the_api_runs_one_process_per_cpu_of_its_limit() -> None:
    (api,) = [w for w in m.workloads() if w.component == "api"]
    (container,) = api.containers
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert int(env["DERMQ_API_PROCESSES"]) == int(container["resources"]["limits"]["cpu"])
