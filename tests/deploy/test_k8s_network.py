"""deploy/k8s/networkpolicies.yaml: every dermq pod is denied by default, and only the components
that need them reach the datastores, the API's port and Redis for KEDA."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy import manifests as m

# --------------------------------------------------------------------------- NetworkPolicies


def _policies() -> list[dict[str, Any]]:
    return m.k8s_objects("NetworkPolicy")


def _allowed_components(target_labels: dict[str, str], port: int) -> set[str]:
    """dermq components whose pods an ingress policy lets reach pods with target_labels on port."""
    allowed = set()
    for policy in _policies():
        spec = policy["spec"]
        if "Ingress" not in spec["policyTypes"] or not m.selector_matches(spec["podSelector"], target_labels):
            continue
        for rule in spec.get("ingress", []):
            if not any(p.get("port") == port for p in rule.get("ports", [])):
                continue
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    for component in m.COMPONENTS:
                        labels = {**m.workload(component).labels}
                        if m.selector_matches(peer["podSelector"], labels):
                            allowed.add(component)
    return allowed


def _egress_allowed(component: str, target_labels: dict[str, str], port: int) -> bool:
    labels = m.workload(component).labels
    for policy in _policies():
        spec = policy["spec"]
        if "Egress" not in spec["policyTypes"] or not m.selector_matches(spec["podSelector"], labels):
            continue
        for rule in spec.get("egress", []):
            ports_ok = any(p.get("port") == port for p in rule.get("ports", []))
            peers_ok = any(
                "podSelector" in peer and m.selector_matches(peer["podSelector"], target_labels)
                for peer in rule.get("to", [])
            )
            if ports_ok and peers_ok:
                return True
    return False


def test_every_dermq_pod_is_denied_by_default() -> None:
    deny = m.k8s_object("NetworkPolicy", "dermq-default-deny")["spec"]
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for w in m.workloads():
        assert m.selector_matches(deny["podSelector"], w.labels), f"{w.name} escapes the default deny"


@pytest.mark.parametrize(
    ("name", "port", "clients"),
    [("postgres", 5432, m.POSTGRES_CLIENTS), ("redis", 6379, m.REDIS_CLIENTS)],
)
def test_only_the_right_components_reach_the_datastores(name: str, port: int, clients: set[str]) -> None:
    target = {"app.kubernetes.io/name": name}
    assert _allowed_components(target, port) == clients
    for component in m.COMPONENTS:
        assert _egress_allowed(component, target, port) == (component in clients), (component, name)


def test_keda_may_reach_redis() -> None:
    redis_policies = [
        p for p in _policies() if m.selector_matches(p["spec"]["podSelector"], {"app.kubernetes.io/name": "redis"})
    ]
    namespaces = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for policy in redis_policies
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    }
    assert "keda" in namespaces


def test_only_the_ingress_controller_reaches_the_api_port() -> None:
    policy = m.k8s_object("NetworkPolicy", "dermq-api-ingress")
    for rule in policy["spec"]["ingress"]:
        namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]}
        ports = {p["port"] for p in rule["ports"]}
        if "http" in ports:
            assert namespaces == {"ingress-nginx"}
        else:
            assert ports == {"metrics"} and namespaces == {"monitoring"}
