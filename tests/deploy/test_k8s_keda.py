"""deploy/k8s's KEDA scaler: it counts every Redis list of the cases queue, sums them, reads the Redis
dermq uses, and agrees with the worker on the queues consumed."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from tests.deploy import manifests as m

# --------------------------------------------------------------------------- KEDA


def test_keda_scales_the_gpu_worker_on_every_list_of_the_cases_queue() -> None:
    from core.queueing import queue_lists

    scaled = m.k8s_object("ScaledObject", "dermq-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == m.workload("worker").name
    assert "nvidia.com/gpu" in m.workload("worker").containers[0]["resources"]["limits"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "maintenance needs a worker at all times"
    # a replica count in the Deployment would undo KEDA's at every `kubectl apply` of a release
    assert "replicas" not in m.k8s_object("Deployment", "dermq-worker")["spec"]

    triggers = spec["triggers"]
    assert all(trigger["type"] == "redis" for trigger in triggers)
    lists = [trigger["metadata"]["listName"] for trigger in triggers]
    assert sorted(lists) == sorted(queue_lists()), f"KEDA counts {lists!r}, the queue is {queue_lists()!r}"
    assert len(set(lists)) == len(lists)
    for trigger in triggers:
        for key in ("address", "listName", "listLength"):
            assert isinstance(trigger["metadata"][key], str), f"KEDA metadata values are strings: {key}"
        assert int(trigger["metadata"]["listLength"]) > 0


def test_keda_sums_the_lists_rather_than_taking_the_longest() -> None:
    spec = m.k8s_object("ScaledObject", "dermq-worker")["spec"]
    names = [trigger["name"] for trigger in spec["triggers"]]
    modifiers = spec["advanced"]["scalingModifiers"]
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(names), f"formula {modifiers['formula']!r} must add up every trigger {names}"
    assert float(modifiers["target"]) > 0
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"


def test_keda_reads_the_redis_that_dermq_uses_with_its_password() -> None:
    # the URL the pods read, with its password, is the Secret's (a ConfigMap key would win over it)
    assert "DERMQ_REDIS_URL" not in m.configmap_data()
    redis_url = urlsplit(m.k8s_object("Secret", "dermq-secrets")["stringData"][m.REDIS_URL])
    database = (redis_url.path or "/0").lstrip("/") or "0"
    for trigger in m.k8s_object("ScaledObject", "dermq-worker")["spec"]["triggers"]:
        host, port = trigger["metadata"]["address"].rsplit(":", 1)
        assert host in (redis_url.hostname, f"{redis_url.hostname}.{m.NAMESPACE}.svc.cluster.local")
        assert int(port) == (redis_url.port or 6379)
        assert trigger["metadata"].get("databaseIndex", "0") == database
        # Redis requires a password: without it every poll is refused (NOAUTH) and KEDA never scales
        assert not {"password", "passwordFromEnv"} & set(trigger["metadata"]), "the password comes from a Secret"
        auth = m.k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        (reference,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "password"]
        secret = m.k8s_object("Secret", reference["name"])
        assert reference["key"] in secret["stringData"], f"{reference['name']} has no key {reference['key']}"


def test_worker_and_keda_agree_on_the_queues_consumed() -> None:
    from core.queueing import QUEUE_CASES, QUEUE_MAINTENANCE

    command = m.workload("worker").containers[0]["command"]
    queues = command[command.index("--queues") + 1].split(",")
    assert sorted(queues) == sorted([QUEUE_CASES, QUEUE_MAINTENANCE])
    assert re.fullmatch(r"[a-z]+", QUEUE_CASES)
