"""The ``dermq_field_*`` gauges: the model's performance on cases with a confirmed outcome.

The worker's periodic ``dermq.field_performance`` task (worker/field.py) computes the figures and
leaves the report in Redis; :class:`api.metrics.StateCollector` reads it once per scrape and turns
it into the gauges below, so a scrape costs one Redis read and every API replica reports the same
values. Labels are the model id, the class code and the ``window``: ``all`` (every confirmed case) or
``recent`` (the cases submitted in the last ``DERMQ_FIELD_WINDOW_MONTHS`` months).

A rate with no cases behind it (no confirmed melanoma yet, say) has no sample; its count is 0.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import GaugeMetricFamily

from ml.labels import CLASSES

_CLASS_RATES = {
    "sensitivity": "sensitivity on confirmed cases: the share of the class's confirmed cases the model labelled so",
    "ppv": "positive predictive value on confirmed cases: the share of the model's labels of the class confirmed",
}
_REFERRAL = (
    "referral sensitivity on confirmed cases: the share of confirmed malignant or pre-malignant cases "
    "(mel, bcc, akiec) that the model referred"
)
_BOUNDS = {
    "": "",
    "_lower": " (lower end of its Wilson 95% interval)",
    "_upper": " (upper end of its Wilson 95% interval)",
}

#: every gauge this module exports (alert rules may use these: tests/deploy checks them)
NAMES = frozenset(
    {f"dermq_field_{rate}{bound}" for rate in (*_CLASS_RATES, "referral_sensitivity") for bound in _BOUNDS}
    | {
        "dermq_field_confirmed_cases",
        "dermq_field_out_of_distribution_cases",
        "dermq_field_mel_sensitivity_floor",
        "dermq_field_report_timestamp_seconds",
    }
)


def _add_rate(families: dict[str, GaugeMetricFamily], name: str, labels: list[str], rate: dict[str, Any]) -> None:
    if rate.get("value") is None or not rate.get("ci95"):
        return
    low, high = rate["ci95"]
    for suffix, value in (("", rate["value"]), ("_lower", low), ("_upper", high)):
        families[f"{name}{suffix}"].add_metric(labels, float(value))


def _windows(report: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The report's figures per window (a report from before the window had ``models`` only)."""
    if not report:
        return {}
    windows = {"all": report.get("models", {})}
    if report.get("recent") is not None:
        windows["recent"] = report["recent"]["models"]
    return windows


def field_families(report: dict[str, Any] | None) -> list[GaugeMetricFamily]:
    """The gauges of a field-performance report (None: no report yet, gauges without samples)."""
    families: dict[str, GaugeMetricFamily] = {}
    for rate, meaning in _CLASS_RATES.items():
        for bound, which in _BOUNDS.items():
            name = f"dermq_field_{rate}{bound}"
            families[name] = GaugeMetricFamily(name, meaning + which, labels=["model_id", "class", "window"])
    for bound, which in _BOUNDS.items():
        name = f"dermq_field_referral_sensitivity{bound}"
        families[name] = GaugeMetricFamily(name, _REFERRAL + which, labels=["model_id", "window"])
    confirmed = GaugeMetricFamily(
        "dermq_field_confirmed_cases",
        "confirmed cases of the class (the sensitivity's denominator, those the gate judged out of "
        "distribution included: each is a miss)",
        labels=["model_id", "class", "window"],
    )
    unscored = GaugeMetricFamily(
        "dermq_field_out_of_distribution_cases",
        "confirmed cases whose image the model judged out of distribution (no diagnosis: missed in the sensitivities)",
        labels=["model_id", "window"],
    )
    floor = GaugeMetricFamily(
        "dermq_field_mel_sensitivity_floor",
        "lower end of the 95% interval of melanoma sensitivity in the model card (its test split); "
        "absent for a model without one",
        labels=["model_id"],
    )
    computed = GaugeMetricFamily(
        "dermq_field_report_timestamp_seconds", "when the field-performance figures were computed (Unix time)"
    )
    for window, models in _windows(report).items():
        for model_id, figures in models.items():
            for code in CLASSES:
                rates = figures["classes"][code]
                for rate in _CLASS_RATES:
                    _add_rate(families, f"dermq_field_{rate}", [model_id, code, window], rates[rate])
                confirmed.add_metric([model_id, code, window], float(rates["sensitivity"]["trials"]))
            _add_rate(families, "dermq_field_referral_sensitivity", [model_id, window], figures["referral_sensitivity"])
            unscored.add_metric([model_id, window], float(figures["out_of_distribution"]))
    for model_id, figures in _windows(report).get("all", {}).items():
        if figures.get("mel_sensitivity_floor") is not None:
            floor.add_metric([model_id], float(figures["mel_sensitivity_floor"]))
    if report and report.get("computed_at") is not None:
        computed.add_metric([], float(report["computed_at"]))
    return [*families.values(), confirmed, unscored, floor, computed]
