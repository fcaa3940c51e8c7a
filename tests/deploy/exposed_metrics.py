"""The Prometheus metrics dermq exposes, for the checks of the alert rules in tests/deploy."""

from __future__ import annotations

#: The Prometheus metrics dermq exposes (API, worker, drift, field performance, audit): alert rules may use these and
#: nothing else (plus Prometheus's own `up` and recording rules defined in the same file).
DERMQ_METRICS = frozenset(
    {
        # API
        "dermq_http_requests_total",
        "dermq_http_request_duration_seconds",
        "dermq_upload_bytes",
        "dermq_upload_rejections_total",
        "dermq_queue_depth",
        "dermq_callback_queue_depth",
        "dermq_oldest_pending_callback_seconds",
        "dermq_cases",
        "dermq_stale_running_cases",
        "dermq_api_event_loop_heartbeat_timestamp_seconds",
        # worker
        "dermq_jobs_total",
        "dermq_queue_wait_seconds",
        "dermq_inference_seconds",
        "dermq_gradcam_seconds",
        "dermq_results_total",
        "dermq_out_of_distribution_reasons_total",
        "dermq_predictions_total",
        "dermq_confidence",
        "dermq_referrals_total",
        "dermq_submit_to_finish_seconds",
        "dermq_failures_total",
        "dermq_lost_cases_total",
        "dermq_image_key_unavailable_total",
        "dermq_callback_deliveries_total",
        "dermq_retention_step_failures_total",
        "dermq_worker_info",
        "dermq_gpu_memory_bytes",
        "dermq_gpu_memory_total_bytes",
        # drift and audit
        "dermq_drift_psi",
        "dermq_drift_alert",
        "dermq_drift_report_age_seconds",
        "dermq_audit_chain_ok",
        "dermq_audit_check_age_seconds",
        "dermq_audit_unsealed_age_seconds",
        "dermq_oldest_queued_case_seconds",
        "dermq_redis_memory_used_bytes",
        "dermq_redis_memory_limit_bytes",
        "dermq_redis_maxmemory_policy_info",
        # field performance on confirmed outcomes (api/field_metrics.py)
        *(
            f"dermq_field_{rate}{bound}"
            for rate in ("sensitivity", "ppv", "referral_sensitivity")
            for bound in ("", "_lower", "_upper")
        ),
        "dermq_field_confirmed_cases",
        "dermq_field_out_of_distribution_cases",
        "dermq_field_mel_sensitivity_floor",
        "dermq_field_report_timestamp_seconds",
    }
)
#: Of those, the histograms (queried through their _bucket, _sum and _count series).
DERMQ_HISTOGRAMS = frozenset(
    {
        "dermq_http_request_duration_seconds",
        "dermq_upload_bytes",
        "dermq_queue_wait_seconds",
        "dermq_inference_seconds",
        "dermq_gradcam_seconds",
        "dermq_confidence",
    }
)
DRIFT_PSI_THRESHOLD = 0.25
