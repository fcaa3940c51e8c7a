"""The installed ``dermq`` command: core's operator commands plus the model and drift commands, which
need the ml package (so they live with the worker, which may import it).

    dermq model list                 # registry entries, the active one marked (DERMQ_MODEL)
    dermq model verify [MODEL]       # SHA-256 of every file, loads, gives its recorded answer
    dermq drift report [--day D]     # PSI of the last 24 hours' (or a day's) inputs and diagnoses vs the reference
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from typing import Any

from core.cli import build_parser, run
from core.config import Settings
from core.db import session_scope


def model_list(args: argparse.Namespace, settings: Settings) -> int:
    from ml import registry

    active = registry.resolve(settings.model).resolve() if _exists(settings.model) else None
    rows = []
    for folder, manifest, error in registry.entries():
        row: dict[str, Any] = {"id": folder.name, "active": folder.resolve() == active, "error": error}
        if manifest is not None:
            test = manifest.get("metrics", {}).get("test", {})
            row.update(
                {
                    "version": manifest.get("version"),
                    "architecture": manifest.get("architecture"),
                    "created_at": manifest.get("created_at"),
                    "weights_sha256": manifest.get("files", {}).get("weights", {}).get("sha256"),
                    "balanced_accuracy": test.get("balanced_accuracy"),
                    "default_backend": manifest.get("serving", {}).get("default_backend", "torch"),
                }
            )
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        mark = "*" if row["active"] else " "
        if row["error"]:
            print(f"{mark} {row['id']}  UNUSABLE: {row['error']}")
        else:
            bacc = row["balanced_accuracy"]
            print(
                f"{mark} {row['id']}  v{row['version']}  {row['architecture']}  created {row['created_at']}  "
                f"test balanced accuracy {bacc:.3f}  sha256 {row['weights_sha256'][:16]}..."
                if isinstance(bacc, float)
                else f"{mark} {row['id']}  v{row['version']}"
            )
    if active is None:
        print(f"(DERMQ_MODEL={settings.model} is not in the registry)")
    return 0


def _exists(model: str) -> bool:
    from ml import registry

    try:
        registry.resolve(model)
    except registry.RegistryError:
        return False
    return True


def model_verify(args: argparse.Namespace, settings: Settings) -> int:
    from ml.entry import verify_entry

    checks = verify_entry(args.model or settings.model)
    for name, passed, detail in checks:
        print(f"{'ok  ' if passed else 'FAIL'}  {name}: {detail}")
    ok = all(passed for _, passed, _ in checks)
    print("model verified" if ok else "MODEL FAILED VERIFICATION: do not deploy it")
    return 0 if ok else 1


def drift_report(args: argparse.Namespace, settings: Settings) -> int:
    from worker import drift

    day = date.fromisoformat(args.day) if args.day else None
    with session_scope(settings) as session:
        report = drift.day_report(session, settings, day)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"drift on {report['day']} for {report['model_id']}: {report['n']} cases "
            f"(reference: {report['reference_n']} validation images; alert above PSI {report['threshold']})"
        )
        print(f"  status: {report['status']}" + (f" ({report['note']})" if report.get("note") else ""))
        p_values = report.get("p_value", {})
        for feature, value in report["psi"].items():
            flag = "  DRIFT" if feature in report["drifted"] else ""
            p_value = p_values.get(feature)
            p_text = f"  p {p_value:.4f}" if p_value is not None else ""
            print(f"  {feature:<11} PSI {'n/a' if value is None else f'{value:.3f}'}{p_text}{flag}")
    return 1 if report["drifted"] else 0


def build() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    model = sub.add_parser("model", help="model registry").add_subparsers(dest="action", required=True)
    listing = model.add_parser("list", help="registry entries; * marks the active one (DERMQ_MODEL)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=model_list)
    verify = model.add_parser("verify", help="SHA-256, load and known answer of an entry (default: the active one)")
    verify.add_argument("model", nargs="?", help="model id or entry folder")
    verify.set_defaults(handler=model_verify)
    drift = sub.add_parser("drift", help="input and prediction drift").add_subparsers(dest="action", required=True)
    report = drift.add_parser("report", help="PSI against the model's reference; exit 1 if drifted")
    report.add_argument("--day", help="YYYY-MM-DD: that UTC day (default: the 24 hours up to now)")
    report.add_argument("--json", action="store_true")
    report.set_defaults(handler=drift_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build(), argv)


if __name__ == "__main__":
    sys.exit(main())
