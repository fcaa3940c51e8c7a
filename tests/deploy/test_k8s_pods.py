"""deploy/k8s: what the pods do around their main process: keep the period keys out of Velero's
file-system backups, size the worker's threads to its CPU limit, drain the API before it stops,
ship the audit witness off the pod, and keep the callback worker off the GPUs and the patient data."""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

import pytest

from tests.deploy import manifests as m

PERIOD_KEYS_CLAIM = "dermq-period-keys"
#: Velero's pod annotations for file-system backup (restic/kopia): opt-out and opt-in lists of volumes.
VELERO_EXCLUDES = "backup.velero.io/backup-volumes-excludes"
VELERO_INCLUDES = "backup.velero.io/backup-volumes"
#: A node far bigger than any pod's CPU limit: what os.cpu_count() says inside a container there.
BIG_NODE_CPUS = 128
#: Seconds the API's grace period keeps beyond its preStop sleep and the longest long poll.
API_SHUTDOWN_MARGIN = 10


def _annotation_list(annotations: dict[str, str], key: str) -> set[str]:
    return {name.strip() for name in annotations.get(key, "").split(",") if name.strip()}


def _cpus(quantity: object) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_every_pod_that_mounts_the_period_keys_keeps_them_out_of_velero_file_system_backups() -> None:
    pvc = m.k8s_object("PersistentVolumeClaim", PERIOD_KEYS_CLAIM)
    assert pvc["metadata"]["labels"]["velero.io/exclude-from-backup"] == "true"
    mounting = set()
    for w in m.workloads():
        volumes = {
            volume["name"]
            for volume in w.pod.get("volumes", [])
            if volume.get("persistentVolumeClaim", {}).get("claimName") == PERIOD_KEYS_CLAIM
        }
        if not volumes:
            continue
        mounting.add(w.component)
        annotations = w.obj["spec"]["template"]["metadata"].get("annotations", {})
        assert volumes <= _annotation_list(annotations, VELERO_EXCLUDES), (
            f"{w.name}: Velero's file-system backup would copy {sorted(volumes)}; name them in {VELERO_EXCLUDES}"
        )
        assert not volumes & _annotation_list(annotations, VELERO_INCLUDES), f"{w.name} opts the period keys in"
    assert {"api", "worker"} <= mounting


def _celery_workers() -> list[tuple[m.Workload, dict[str, Any]]]:
    return [
        (w, container)
        for w in m.workloads()
        for container in w.containers
        if (container.get("command") or [])[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    ]


def test_worker_children_times_their_threads_fit_the_cpu_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import Settings
    from worker import runtime

    for key in [k for k in os.environ if k.startswith("DERMQ_")]:
        monkeypatch.delenv(key)
    # the node's count, as where the pod's CPU limit cannot be read (core.cpus reads its cgroup)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: BIG_NODE_CPUS)
    workers = _celery_workers()
    assert workers
    for w, container in workers:
        env = m.container_environment(container)
        fields = {"worker_concurrency", "worker_threads", "device"}
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            **{name: env[f"DERMQ_{name.upper()}"] for name in fields if f"DERMQ_{name.upper()}" in env},
        )
        gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        monkeypatch.setattr(runtime, "cuda_device_present", lambda _settings, gpu=gpu: gpu)
        children = runtime.worker_concurrency(settings)
        threads = runtime.threads_per_child(settings)
        limit = _cpus(container["resources"]["limits"]["cpu"])
        assert children * threads <= limit, (
            f"{w.name}: {children} children x {threads} threads on a {limit:g}-CPU limit; set DERMQ_WORKER_THREADS"
        )


def test_the_api_keeps_serving_while_the_ingress_lets_go_and_then_finishes_its_long_polls() -> None:
    from api.waiters import MAX_WAIT_SECONDS

    api = m.workload("api")
    (container,) = api.containers
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pause = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", f"preStop runs {command}"
        pause = float(command[1])
    assert pause >= 5, "the ingress controller needs a few seconds to drop the endpoint"
    grace = api.pod["terminationGracePeriodSeconds"]
    assert grace >= pause + MAX_WAIT_SECONDS + API_SHUTDOWN_MARGIN, (
        f"{grace} s grace: preStop {pause:g} s + long polls up to {MAX_WAIT_SECONDS:g} s + a margin"
    )


def _mount_holding(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    holding = [
        mount
        for mount in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(PurePosixPath(mount["mountPath"]))
    ]
    return max(holding, key=lambda mount: len(mount["mountPath"]), default=None)


def _follows(sidecar: dict[str, Any], path: str) -> bool:
    command = [*sidecar.get("command", []), *sidecar.get("args", [])]
    return command[:1] == ["tail"] and "-F" in command and "+1" in command and command[-1] == path


def test_a_witness_file_on_an_emptydir_is_followed_off_the_pod_by_a_read_only_sidecar() -> None:
    witnessed = 0
    for w in m.workloads():
        volumes = {volume["name"]: volume for volume in w.pod.get("volumes", [])}
        for container in w.containers:
            path = m.container_environment(container).get("DERMQ_AUDIT_WITNESS_FILE")
            if not path:
                continue
            mount = _mount_holding(container, path)
            assert mount is not None and not mount.get("readOnly"), f"{w.name}: {path} is not on a writable volume"
            if "emptyDir" not in volumes[mount["name"]]:
                continue
            witnessed += 1
            relative = PurePosixPath(path).relative_to(mount["mountPath"])
            followers = []
            for sidecar in w.pod.get("initContainers", []):
                for seen in sidecar.get("volumeMounts", []):
                    if seen["name"] == mount["name"] and _follows(
                        sidecar, str(PurePosixPath(seen["mountPath"]) / relative)
                    ):
                        assert seen.get("readOnly") is True, f"{w.name}: {sidecar['name']} may write the witness"
                        followers.append(sidecar)
            assert followers, f"{w.name}: nothing ships {path} off the pod (its emptyDir dies with it)"
            for sidecar in followers:
                assert sidecar.get("restartPolicy") == "Always", f"{sidecar['name']}: a native sidecar runs all along"
                assert sidecar["image"] == container["image"]
                assert sidecar["securityContext"] == container["securityContext"]
    assert witnessed, "the worker keeps its witness file on an emptyDir"


def test_init_containers_are_locked_down_and_sized_like_the_containers() -> None:
    for w in m.workloads():
        for container in w.pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, w.name
            assert security["readOnlyRootFilesystem"] is True, w.name
            assert security["capabilities"] == {"drop": ["ALL"]}, w.name
            assert security.get("runAsUser", w.pod["securityContext"]["runAsUser"]) != 0, w.name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{w.name}: {kind}"


def test_the_callback_worker_delivers_callbacks_alone_on_any_node_without_the_patient_data() -> None:
    from core.config import CALLBACK_RECORD_SECONDS, Settings

    w = m.workload("callbacks")
    (container,) = w.containers
    assert w.kind == "Deployment" and 1 <= w.obj["spec"]["replicas"] <= 2
    assert container["image"] == "dermq-worker"
    assert container["command"] == ["celery", "-A", m.CALLBACKS_APP, "worker", "--queues", "callbacks"]
    # no GPU: neither requested nor scheduled for (the model is never loaded there)
    for kind in ("requests", "limits"):
        assert not any("gpu" in name for name in container["resources"][kind]), kind
    assert "nodeSelector" not in w.pod and "tolerations" not in w.pod
    assert _cpus(container["resources"]["limits"]["cpu"]) <= 1
    # neither the period keys (no case's blob opens there) nor the audit witness (no sealer)
    claims = [v for v in w.pod["volumes"] if "persistentVolumeClaim" in v]
    assert not claims, f"{w.name} mounts {claims}"
    env = m.container_environment(container)
    assert "DERMQ_AUDIT_WITNESS_FILE" not in env and "DERMQ_AUDIT_SIGNING_KEY_FILE" not in env
    threads = int(env["DERMQ_CALLBACK_WORKER_THREADS"])  # a setting in range (Settings refuses others)
    assert Settings(_env_file=None, callback_worker_threads=threads).callback_worker_threads == threads
    # the warm shutdown lets the attempts under way end: each within three timeouts, plus its record
    timeout = float(
        env.get("DERMQ_CALLBACK_TIMEOUT_SECONDS", Settings.model_fields["callback_timeout_seconds"].default)
    )
    assert w.pod["terminationGracePeriodSeconds"] > 3 * timeout + CALLBACK_RECORD_SECONDS
