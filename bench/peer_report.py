"""bench.peer's report: each system's figures, and the table of both against issue 16's targets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bench.common import p50, percentile, table
from bench.peer_clients import LoadRun

IDLE_P50_TARGET = 2.0
THROUGHPUT_TARGET = 0.5


@dataclass(frozen=True)
class Figures:
    """One system's measurements over the whole run."""

    idle: list[float]
    runs: list[LoadRun]
    idle_errors: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return sum(run.rate for run in self.runs) / len(self.runs)

    @property
    def loaded(self) -> list[float]:
        return [latency for run in self.runs for latency in run.latencies]

    @property
    def error_kinds(self) -> Counter[str]:
        kinds = Counter(self.idle_errors)
        for run in self.runs:
            kinds.update(run.errors)
        return kinds

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    def row(self, label: str) -> list[str]:
        rates = [run.rate for run in self.runs]
        spread = f" ({min(rates):.0f}-{max(rates):.0f})" if len(rates) > 1 else ""
        return [
            label,
            seconds(p50(self.idle)),
            seconds(percentile(self.idle, 95)),
            f"{self.rate:.1f}{spread}",
            seconds(percentile(self.loaded, 50)),
            seconds(percentile(self.loaded, 95)),
            str(self.errors),
        ]


def images_per_second(rates: list[float]) -> str:
    """The median of repeated measurements, with their range."""
    ordered = sorted(rates)
    return f"{p50(ordered):.0f} images/s ({ordered[0]:.0f}-{ordered[-1]:.0f})"


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def comparison(
    peer: Figures, dermq: Figures, labels: tuple[str, str], ceiling: tuple[str, str], clients: int
) -> tuple[str, dict[str, bool]]:
    """The table of both systems, the raw ceiling, the ratios dermq/peer and issue 16's targets;
    and whether each target is met."""
    idle_ratio = p50(dermq.idle) / p50(peer.idle)
    rate_ratio = dermq.rate / peer.rate
    met = {
        f"idle p50 <= {IDLE_P50_TARGET:g}x the peer's": idle_ratio <= IDLE_P50_TARGET,
        f"throughput >= {THROUGHPUT_TARGET:g}x the peer's": rate_ratio >= THROUGHPUT_TARGET,
        "0 errors (dermq)": dermq.errors == 0,
    }
    verdicts = ["yes" if ok else "NO" for ok in met.values()]

    def ratio(ours: float, theirs: float) -> str:
        return f"{ours / theirs:.2f}x"

    rows = [
        peer.row(labels[0]),
        dermq.row(labels[1]),
        [ceiling[0], "", "", ceiling[1], "", "", ""],
        [
            "dermq / peer",
            f"{idle_ratio:.2f}x",
            ratio(percentile(dermq.idle, 95), percentile(peer.idle, 95)),
            f"{rate_ratio:.2f}x",
            ratio(percentile(dermq.loaded, 50), percentile(peer.loaded, 50)),
            ratio(percentile(dermq.loaded, 95), percentile(peer.loaded, 95)),
            "",
        ],
        ["target (issue 16)", f"<= {IDLE_P50_TARGET:.2f}x", "", f">= {THROUGHPUT_TARGET:.2f}x", "", "", "0"],
        ["met", verdicts[0], "", verdicts[1], "", "", verdicts[2]],
    ]
    headers = ["", "idle p50", "idle p95", f"{clients} clients: completed/s", "p50 under load", "p95 under load"]
    return table([*headers, "errors (warm-up too)"], rows), met


def cpu_per_case(spent: dict[str, dict[str, float]], completed: dict[str, int]) -> str:
    """One line: each system's server CPU (its processes, not the client's) per case completed under
    load, dermq's by process, and dermq's over the peer's. ``spent``: system -> process -> CPU
    seconds summed over its loaded runs; ``completed``: system -> cases completed in them."""
    per_case = {
        name: {part: 1000 * seconds / max(completed[name], 1) for part, seconds in parts.items()}
        for name, parts in spent.items()
    }
    totals = {name: sum(parts.values()) for name, parts in per_case.items()}
    dermq = ", ".join(f"{part} {value:.1f}" for part, value in per_case["dermq"].items())
    ratio = totals["dermq"] / totals["peer"] if totals["peer"] > 0 else float("nan")
    return (
        f"server CPU per case completed under load: peer {totals['peer']:.1f} ms, dermq {totals['dermq']:.1f} ms "
        f"({dermq}): dermq / peer {ratio:.2f}x; not counted for dermq: Redis, Postgres's background processes, "
        "and the sweep and sealer, threads of this benchmark's process (about a millisecond a case in all)"
    )
