"""deploy/prometheus: the scrape targets are the ports the services listen on, and the alert rules
parse, use only metrics that dermq exposes (tests/deploy/exposed_metrics.py), cover what operators
must hear about, and link runbook sections that exist."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy import manifests as m
from tests.deploy.exposed_metrics import DERMQ_HISTOGRAMS, DERMQ_METRICS, DRIFT_PSI_THRESHOLD

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "delta", "deriv", "exp", "floor", "histogram_quantile", "histogram_count", "histogram_sum",
    "histogram_fraction", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log2", "log10", "max_over_time", "min_over_time", "predict_linear", "quantile_over_time", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "sum_over_time", "time", "timestamp",
    "vector",
}  # fmt: skip
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "atan2", "inf", "nan"}  # fmt: skip
BUILTIN_SERIES = {"up"}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"(\d+[smhdwy])+")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    doc = m.load_yaml(m.ALERTS)
    found = [rule for group in doc["groups"] for rule in group["rules"]]
    assert found
    return found


def _alerts(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for rule in rules if "alert" in rule]


def _recorded(rules: list[dict[str, Any]]) -> set[str]:
    return {rule["record"] for rule in rules if "record" in rule}


def series_and_functions(expr: str) -> tuple[set[str], set[str]]:
    """The series names and the function names a PromQL expression uses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    series, functions = set(), set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if name in KEYWORDS:
            continue
        (functions if call else series).add(name)
    return series, functions


def _metric_of(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if series.endswith(suffix) and base in DERMQ_HISTOGRAMS:
            return base
    return series


def test_the_expression_reader_sees_what_is_there() -> None:
    series, functions = series_and_functions(
        'histogram_quantile(0.95, sum by (le) (rate(dermq_http_request_duration_seconds_bucket{route!~"/x|y"}[5m])))'
        ' > 2 and on() (sum(up{job="dermq-api"}) or vector(0)) == 0'
    )
    assert series == {"dermq_http_request_duration_seconds_bucket", "up"}
    assert functions == {"histogram_quantile", "sum", "rate", "vector"}
    assert _metric_of("dermq_http_request_duration_seconds_bucket") == "dermq_http_request_duration_seconds"
    assert _metric_of("dermq_http_requests_total") == "dermq_http_requests_total"


def test_every_rule_is_an_alert_or_a_recording_rule(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        assert ("alert" in rule) != ("record" in rule), rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule.get("alert", rule.get("record"))
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z_:]+", rule["record"]), "recording rules follow level:metric:operations"
    names = [rule["alert"] for rule in _alerts(rules)]
    assert len(names) == len(set(names)), "alert names are unique"


def test_alert_rules_use_only_metrics_that_dermq_exposes(rules: list[dict[str, Any]]) -> None:
    allowed = DERMQ_METRICS | BUILTIN_SERIES | _recorded(rules)
    for rule in rules:
        series, functions = series_and_functions(rule["expr"])
        unknown_functions = functions - FUNCTIONS - AGGREGATIONS
        assert not unknown_functions, f"{rule.get('alert', rule.get('record'))}: unknown functions {unknown_functions}"
        unknown = {s for s in series if _metric_of(s) not in allowed}
        assert not unknown, f"{rule.get('alert', rule.get('record'))}: dermq exposes no {sorted(unknown)}"
        for name in series:
            base = _metric_of(name)
            if base in DERMQ_HISTOGRAMS:
                assert name != base, f"{base} is a histogram: query its _bucket, _sum or _count series"


def test_a_misspelt_metric_would_be_caught(rules: list[dict[str, Any]]) -> None:
    allowed = DERMQ_METRICS | BUILTIN_SERIES | _recorded(rules)
    series, _ = series_and_functions('sum(rate(dermq_http_request_total{status=~"5.."}[5m]))')
    assert {s for s in series if _metric_of(s) not in allowed} == {"dermq_http_request_total"}


def test_alerts_have_severity_summary_and_a_runbook_section(rules: list[dict[str, Any]]) -> None:
    runbook = m.RUNBOOK.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{2,3} (.+)$", runbook, flags=re.MULTILINE)
    }
    for alert in _alerts(rules):
        name = alert["alert"]
        assert re.fullmatch(r"Dermq[A-Za-z0-9]+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert (m.ROOT / path).resolve() == m.RUNBOOK.resolve(), name
        assert anchor in anchors, f"{name}: RUNBOOK.md has no section #{anchor}"
        if "for" in alert:
            assert DURATION.fullmatch(alert["for"]), name


CONCERNS = {
    "API down": lambda e: 'up{job="dermq-api"}' in e,
    "API 5xx rate": lambda e: "dermq_http_requests_total" in e and '"5.."' in e,
    "API p95 latency": lambda e: "histogram_quantile(0.95" in e and "dermq_http_request_duration_seconds_bucket" in e,
    "queue backlog growing": lambda e: "dermq_queue_depth" in e and "deriv(" in e,
    "stale running cases": lambda e: "dermq_stale_running_cases" in e,
    "cases queued in Postgres that no worker takes": lambda e: "dermq_oldest_queued_case_seconds" in e,
    "cases put back because their key cannot be loaded": lambda e: "dermq_image_key_unavailable_total" in e,
    "Redis near its maxmemory": lambda e: (
        "dermq_redis_memory_used_bytes" in e and "dermq_redis_memory_limit_bytes" in e
    ),
    "Redis deleting keys when full": lambda e: "dermq_redis_maxmemory_policy_info" in e and "noeviction" in e,
    "case failure rate": lambda e: "dermq_jobs_total" in e and 'outcome="failed"' in e,
    "no worker up": lambda e: 'up{job="dermq-worker"}' in e,
    "no callback worker up": lambda e: 'up{job="dermq-callbacks"}' in e,
    "callbacks due that no callback worker takes": lambda e: (
        "dermq_callback_queue_depth" in e and "dermq_callback_deliveries_total" in e
    ),
    "drift": lambda e: "dermq_drift_alert" in e,
    "audit chain broken": lambda e: "dermq_audit_chain_ok" in e,
    "audit sealing stalled": lambda e: "dermq_audit_unsealed_age_seconds" in e,
    "audit check not finishing": lambda e: "dermq_audit_check_age_seconds" in e and "absent(" in e,
    "GPU memory near full": lambda e: "dermq_gpu_memory_bytes" in e,
    "melanoma sensitivity on confirmed cases": lambda e: "dermq_field_mel_sensitivity_floor" in e,
}


@pytest.mark.parametrize("concern", sorted(CONCERNS))
def test_operators_are_alerted_about(concern: str, rules: list[dict[str, Any]]) -> None:
    assert any(CONCERNS[concern](alert["expr"]) for alert in _alerts(rules)), f"no alert for {concern}"


def test_drift_alert_follows_the_reports_verdict(rules: list[dict[str, Any]]) -> None:
    """The alert fires on the drift report's own verdict (a PSI above the agreed threshold that sampling
    noise does not explain), not on a raw PSI that noise alone passes in about 1 % of reports."""
    from ml.drift import PSI_ALERT

    (drift,) = [a for a in _alerts(rules) if "dermq_drift_alert" in a["expr"]]
    assert re.fullmatch(r"max\(dermq_drift_alert\)\s*==\s*1", drift["expr"].strip()), drift["expr"]
    assert PSI_ALERT == DRIFT_PSI_THRESHOLD
    assert str(DRIFT_PSI_THRESHOLD) in drift["annotations"]["description"]


def test_field_gauges_listed_here_are_the_ones_the_api_exports() -> None:
    from api.field_metrics import NAMES, field_families

    assert {name for name in DERMQ_METRICS if name.startswith("dermq_field_")} == NAMES
    assert {family.name for family in field_families(None)} == NAMES


def test_melanoma_alert_compares_the_fields_upper_bound_with_the_cards_floor_on_enough_cases(
    rules: list[dict[str, Any]],
) -> None:
    """The alert fires only when the whole 95% interval of the field figure lies below the card's
    lower bound (not on a point estimate that noise alone pushes below it in about 15% of reports),
    on at least the number of confirmed melanomas that `dermq monitor report` requires, per model and
    per window (all confirmed cases, or the recent ones: each window's count decides for its own figure,
    and the model's one floor is matched to both)."""
    from core.outcomes import MIN_CONFIRMED_MELANOMAS

    (alert,) = [a for a in _alerts(rules) if "dermq_field_mel_sensitivity_floor" in a["expr"]]
    expr = " ".join(alert["expr"].split())
    upper = r'max by \(model_id, window\) \(dermq_field_sensitivity_upper\{class="mel"\}\)'
    floor = r"max by \(model_id\) \(dermq_field_mel_sensitivity_floor\)"
    count = r'max by \(model_id, window\) \(dermq_field_confirmed_cases\{class="mel"\}\)'
    found = re.fullmatch(
        rf"{upper} < on \(model_id\) group_left {floor} and on \(model_id, window\) {count} >= (\d+)", expr
    )
    assert found, expr
    assert int(found.group(1)) == MIN_CONFIRMED_MELANOMAS
    assert alert["labels"]["severity"] == "critical"


def test_gpu_memory_alert_compares_a_cards_use_with_its_own_size(rules: list[dict[str, Any]]) -> None:
    # each worker child reports the whole card's use (a series per pid, the same number): summed, two
    # children would double it; and the card's size comes from the card, not a number set by hand
    (rule,) = [r for r in _alerts(rules) if r["alert"] == "DermqGpuMemoryNearFull"]
    expr = rule["expr"].strip()
    assert expr == (
        "max by (instance, device) (dermq_gpu_memory_bytes) > 0.9 * max by (instance, device) "
        "(dermq_gpu_memory_total_bytes)"
    )


def test_the_callback_alerts_select_the_callback_workers_job_and_count_every_attempt(
    rules: list[dict[str, Any]], scrape_jobs: dict[str, dict[str, Any]]
) -> None:
    # the Kubernetes relabelling names a job dermq-<component> (deploy/README.md): the same name here
    relabel = "{source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component], replacement: 'dermq-$1'"
    assert relabel in (m.DEPLOY / "README.md").read_text()
    assert (
        m.workload("callbacks").labels["app.kubernetes.io/component"] == "callbacks"
        and "dermq-callbacks" in scrape_jobs
    )
    (down,) = [a for a in _alerts(rules) if a["alert"] == "DermqCallbackWorkerDown"]
    assert " ".join(down["expr"].split()) == '(sum(up{job="dermq-callbacks"}) or vector(0)) == 0'
    (taken,) = [a for a in _alerts(rules) if a["alert"] == "DermqCallbacksNotTaken"]
    expr = " ".join(taken["expr"].split())
    # any outcome counts as taken (a receiver that refuses is the clinic's matter), and no series at
    # all (no attempt since the worker started) as none
    assert expr == (
        "max(dermq_callback_queue_depth) > 0 and on() "
        "(sum(rate(dermq_callback_deliveries_total[15m])) or vector(0)) == 0"
    ), expr


def test_audit_chain_alert_is_critical_and_immediate(rules: list[dict[str, Any]]) -> None:
    (audit,) = [a for a in _alerts(rules) if "dermq_audit_chain_ok" in a["expr"]]
    assert audit["labels"]["severity"] == "critical"
    assert audit.get("for", "0s") in ("0s", "0m")


# --------------------------------------------------------------------------- prometheus.yml


@pytest.fixture(scope="module")
def scrape_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in m.load_yaml(m.PROMETHEUS_CONF)["scrape_configs"]}


def _targets(job: dict[str, Any]) -> set[tuple[str, int]]:
    targets = set()
    for sd in job.get("dns_sd_configs", []):
        targets.update((name, int(sd["port"])) for name in sd["names"])
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, port = target.rsplit(":", 1)
            targets.add((host, int(port)))
    return targets


def _setting(service: str, variable: str) -> int:
    from core.config import Settings

    env = m.compose_environment(m.compose_services()[service])
    field = variable.removeprefix("DERMQ_").lower()
    return int(env.get(variable, Settings.model_fields[field].default))


def test_scrape_targets_are_the_metrics_listeners_of_the_services(scrape_jobs: dict[str, dict[str, Any]]) -> None:
    assert _targets(scrape_jobs["dermq-api"]) == {("api", _setting("api", "DERMQ_METRICS_PORT"))}
    assert _targets(scrape_jobs["dermq-worker"]) == {
        (name, _setting(name, "DERMQ_WORKER_METRICS_PORT")) for name in ("worker", "worker-cpu")
    }
    # a job of its own: a callback worker alone must not keep DermqNoWorkerUp quiet
    assert _targets(scrape_jobs["dermq-callbacks"]) == {
        ("worker-callbacks", _setting("worker-callbacks", "DERMQ_WORKER_METRICS_PORT"))
    }
    assert _targets(scrape_jobs["dermq-flower"]) == {("flower", _setting("flower", "DERMQ_FLOWER_PORT"))}
    for job in scrape_jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"


def test_scraped_ports_are_exposed_on_the_internal_network(scrape_jobs: dict[str, dict[str, Any]]) -> None:
    services = m.compose_services()
    for job_name in ("dermq-api", "dermq-worker", "dermq-callbacks", "dermq-flower"):
        for host, port in _targets(scrape_jobs[job_name]):
            assert str(port) in services[host].get("expose", []), f"{host}:{port} is scraped but not exposed"
            assert "backend" in services[host]["networks"] and "backend" in services["prometheus"]["networks"]


def test_the_readmes_extra_gpu_workers_are_scraped(
    scrape_jobs: dict[str, dict[str, Any]], compose_schema: dict[str, Any]
) -> None:
    # a worker service added per further GPU (deploy/README.md) resolves by its own name only, which
    # no scrape job lists: it is scraped through an alias that the worker job resolves
    readme = (m.DEPLOY / "README.md").read_text()
    (block,) = [b for b in readme.split("```yaml\n")[1:] if b.startswith("# compose.gpus.yml:")]
    block = block.split("```", 1)[0]
    override = yaml.safe_load(block)
    jsonschema.validate(override, compose_schema)
    services = override["services"]
    scraped = {name for name, _ in _targets(scrape_jobs["dermq-worker"])}
    assert services
    for name, service in services.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] and "count" not in device, name
        aliases = set(service["networks"]["backend"]["aliases"])
        assert aliases & scraped, f"{name}: Prometheus resolves {sorted(scraped)}, {name} answers to {aliases}"


def test_alerts_select_jobs_that_prometheus_scrapes(rules: list[dict[str, Any]], scrape_jobs: dict[str, Any]) -> None:
    for alert in _alerts(rules):
        for job in re.findall(r'job="([^"]+)"', alert["expr"]):
            assert job in scrape_jobs, f"{alert['alert']} selects job {job}, which nothing scrapes"


def test_prometheus_loads_the_rules_file_that_compose_mounts() -> None:
    config = m.load_yaml(m.PROMETHEUS_CONF)
    mounts = dict(v.split(":")[:2] for v in m.compose_services()["prometheus"]["volumes"] if v.startswith("./"))
    rule_files = config["rule_files"]
    assert mounts["./deploy/prometheus/alerts.yml"] in rule_files
    assert mounts["./deploy/prometheus/prometheus.yml"] in " ".join(m.compose_services()["prometheus"]["command"])
