"""deploy/k8s/networkpolicies.yaml: every dermq pod is denied by default, and only the components
that need them reach the datastores, the API's port and Redis for KEDA; the callback worker alone
has a way out, HTTPS to public addresses."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
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


def _egress_rules(component: str) -> Iterator[dict[str, Any]]:
    """Every egress rule of the policies that select ``component``'s pods."""
    labels = m.workload(component).labels
    for policy in _policies():
        spec = policy["spec"]
        if "Egress" in spec["policyTypes"] and m.selector_matches(spec["podSelector"], labels):
            yield from spec.get("egress", [])


def _egress_allowed(component: str, target_labels: dict[str, str], port: int) -> bool:
    for rule in _egress_rules(component):
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


# --------------------------------------------------------------------------- the way out

#: Where no dermq pod may go: the cluster's own pods, Services and nodes, the datastores, the
#: node's loopback and the cloud's metadata service (169.254.169.254) live in these ranges.
NON_PUBLIC = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "::1/128", "::ffff:0:0/96", "fc00::/7", "fe80::/10",
]  # fmt: skip
#: Public addresses a portal might have: the way out must reach them.
PUBLIC = ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111"]


def _ip_blocks(component: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(ipBlock, its rule) for every egress rule of the policies selecting ``component``'s pods that
    names addresses rather than pods; a rule without ``to`` reaches everywhere, as 0.0.0.0/0 and ::/0."""
    blocks = []
    for rule in _egress_rules(component):
        if not rule.get("to"):
            blocks += [({"cidr": "0.0.0.0/0"}, rule), ({"cidr": "::/0"}, rule)]
        blocks += [(peer["ipBlock"], rule) for peer in rule.get("to", []) if "ipBlock" in peer]
    return blocks


def _reaches(block: dict[str, Any], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    inside = ip.version == ipaddress.ip_network(block["cidr"]).version and ip in ipaddress.ip_network(block["cidr"])
    return inside and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []) if _same(e, address))


def _same(network: str, address: str) -> bool:
    return ipaddress.ip_network(network).version == ipaddress.ip_address(address).version


def test_only_the_callback_worker_has_a_way_out() -> None:
    # The classification workers decrypt the images: they, the API, beat, Flower and the migration
    # job reach DNS and the datastores (pods, by label), and no address outside the cluster.
    for component in sorted(m.COMPONENTS - {"callbacks"}):
        assert not _ip_blocks(component), f"{component} may reach addresses outside the cluster"
    assert _ip_blocks("callbacks"), "the callback worker cannot reach the clinics' portals"


def test_the_way_out_is_tcp_to_public_addresses_only() -> None:
    from core.callback_urls import public_address

    blocks = _ip_blocks("callbacks")
    for block, rule in blocks:
        ports = [(p.get("protocol", "TCP"), p.get("port"), p.get("endPort")) for p in rule.get("ports", [])]
        # TCP, on any port: a portal's URL may name one, and registration accepts it (a rule of 443
        # alone failed every delivery to https://portal.example:8443/, after the PUT had succeeded)
        assert ports == [("TCP", None, None)], f"{block['cidr']}: the portals are reached over TCP, on any port"
        for network in NON_PUBLIC:
            net = ipaddress.ip_network(network)
            # every address of the range is left out: its first and last, and the ranges nested in it
            for address in (str(net.network_address), str(net.broadcast_address)):
                assert not _reaches(block, address), f"{block['cidr']} reaches {address} ({network})"
            if net.version == ipaddress.ip_network(block["cidr"]).version and net.overlaps(
                ipaddress.ip_network(block["cidr"])
            ):
                assert any(
                    _same(e, str(net.network_address)) and net.subnet_of(ipaddress.ip_network(e))  # type: ignore[arg-type]
                    for e in block.get("except", [])
                ), f"{block['cidr']} leaves {network} open"
        # what is left out, dermq's own guard refuses too (the policy is its second wall, not a
        # narrower rule that would fail a portal the guard accepts)
        for excluded in block.get("except", []):
            net = ipaddress.ip_network(excluded)
            assert not public_address(net.network_address) and not public_address(net.broadcast_address), excluded
    for address in PUBLIC:
        assert any(_reaches(block, address) for block, _ in blocks), f"the callback worker cannot reach {address}"


def test_prometheus_may_scrape_the_workers() -> None:
    for component in ("worker", "callbacks"):
        labels = m.workload(component).labels
        scraped = [
            rule
            for policy in _policies()
            if "Ingress" in policy["spec"]["policyTypes"] and m.selector_matches(policy["spec"]["podSelector"], labels)
            for rule in policy["spec"].get("ingress", [])
            if any(
                peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                == "monitoring"
                for peer in rule.get("from", [])
            )
        ]
        assert [p["port"] for rule in scraped for p in rule["ports"]] == ["metrics"], component
        assert "metrics" in m.named_ports(m.workload(component).containers[0]), component
