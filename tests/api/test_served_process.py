"""A ``dermq-api`` process of several: uvicorn spawns each (a new interpreter), and each logs as the
one process does, JSON lines at the configured level (before, only warnings reached stderr, as plain
text, from every process but the supervisor)."""

from __future__ import annotations

from tests import probes


def test_each_of_several_api_processes_logs_json_lines_at_the_configured_level(stack_env: dict[str, str]) -> None:
    state = probes.probe(
        """
import json, logging
from api.app import create_served_app
create_served_app()
root = logging.getLogger()
print(json.dumps({"level": root.level, "formatters": [type(h.formatter).__name__ for h in root.handlers]}))
""",
        {**stack_env, "DERMQ_LOG_LEVEL": "INFO", "DERMQ_LOG_JSON": "true"},
    )
    assert state["level"] == 20  # INFO
    assert state["formatters"] == ["JsonFormatter"]
