"""The `dermq` command's interface, which operators' scripts parse: every command and option, the JSON
shapes, the `*` on the active model, and exit code 2 with a one-line message (never a traceback) on
bad input. Runs `python -m cli` (the command of these sources) in a subprocess unless a test says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import click
import pytest
from sqlalchemy import func, select, update

from cli.main import dermq, main
from core.db import session_scope
from core.keys import TOKEN_RE
from core.models import ApiKey, AuditEvent, Role
from tests import support

#: Today's commands and their options and arguments (click's parameter names): scripts call them.
COMMANDS = {
    "db create": set(),
    "db upgrade": {"lock_timeout"},
    "db roles": {"owner", "runtime", "owner_password_file", "runtime_password_file"},
    "db grant": {"runtime"},
    "keys init": {"file"},
    "keys rotate": {"batch", "no_rewrap"},
    "keys rewrap": {"batch"},
    "keys status": {"as_json"},
    "keys retire": {"kek_id"},
    "keys periods": {"as_json"},
    "keys destroy-period": {"period", "force", "yes"},
    "clinic create": {"name", "as_json"},
    "clinic list": {"as_json"},
    "clinic deactivate": {"clinic_name"},
    "clinic activate": {"clinic_name"},
    "key create": {"clinic", "role", "label", "as_json"},
    "key list": {"clinic", "as_json"},
    "key revoke": {"key_ref"},
    "case erase": {"case_id", "yes"},
    "case purge-expired": {"dry_run"},
    "audit verify": {"against", "every", "verifiers", "as_json"},
    "audit checkpoint": {"verifiers", "as_json"},
    "model list": {"as_json"},
    "model verify": {"model_id"},
    "drift report": {"day", "as_json"},
    "monitor report": {"model_id", "mel_floor", "min_melanomas", "months", "as_json"},
    "demo": {"clinic_name", "key_file"},
}


def run(settings, *args: str, answer: str = "", **env: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """``dermq *args`` with the settings' database and key file; ``answer`` is its standard input."""
    environment = {
        **os.environ,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_KEY_FILE": str(settings.key_file),
        **env,
    }
    return subprocess.run(
        [*support.DERMQ, *args],
        input=answer,
        capture_output=True,
        text=True,
        env=environment,
        cwd=support.ROOT,
        timeout=120,
    )


def _leaves(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found |= _leaves(command, f"{path} ")
        else:
            found[path] = command
    return found


def _option_flags(command: click.Command) -> set[str]:
    return {flag for param in command.params for flag in param.opts if flag.startswith("--")} - {"--help"}


def test_every_command_and_option_of_the_cli_is_still_there() -> None:
    leaves = _leaves(dermq)
    assert set(leaves) == set(COMMANDS)
    for path, params in COMMANDS.items():
        assert {p.name for p in leaves[path].params if p.name != "help"} == params, path
    assert _option_flags(leaves["key create"]) == {"--clinic", "--role", "--label", "--json"}
    assert _option_flags(leaves["drift report"]) == {"--day", "--json"}
    assert _option_flags(leaves["demo"]) == {"--clinic", "--key-file"}


def test_help_is_light_and_lists_every_group() -> None:
    # `dermq --help` and the key and clinic commands must not load torch or numpy (the API image has neither).
    code = "import sys, cli.main; print(sorted(m for m in ('torch', 'numpy', 'ml') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=support.ROOT)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    helped = subprocess.run([*support.DERMQ, "--help"], capture_output=True, text=True, cwd=support.ROOT)
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: dermq ")
    for group in ("db", "keys", "clinic", "key", "case", "audit", "model", "drift", "demo", "monitor"):
        assert f"\n  {group} " in helped.stdout, group


def test_model_verify_without_pytorch_says_where_to_run_it_and_exits_2() -> None:
    """In the API's image (no PyTorch) it printed a ModuleNotFoundError traceback and exited 1, which
    the commands' contract reads as "the model failed verification"."""
    code = "import sys; sys.modules['torch'] = None; import cli.main; sys.exit(cli.main.main(['model', 'verify']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=support.ROOT, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "needs PyTorch" in run.stderr and "exec worker dermq model verify" in run.stderr


def test_drift_report_without_numpy_says_where_to_run_it_and_exits_2() -> None:
    """In the API's image (no NumPy) `dermq drift report` printed a ModuleNotFoundError traceback."""
    code = "import sys; sys.modules['numpy'] = None; import cli.main; sys.exit(cli.main.main(['drift', 'report']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=support.ROOT, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "needs numpy" in run.stderr and "worker container" in run.stderr


def _tiny_entries(root: Path, verification_image: Path) -> Path:
    """Two tiny registry entries under ``root``, each with its known answer: ``good-v1`` intact and
    ``odd-v1`` (returned), whose manifest holds a list, a string and an array where objects belong."""
    from ml import registry
    from ml.entry import record_verification
    from tests.ml.conftest import save_tiny_entry

    good, odd = save_tiny_entry(root / "good-v1"), save_tiny_entry(root / "odd-v1")
    for entry in (good, odd):
        record_verification(entry, verification_image)
    manifest = registry.read_manifest(odd)
    manifest.update({"serving": [], "metrics": "none", "verification": "recorded"})
    registry.write_json_atomic(odd / registry.MANIFEST, manifest)
    return odd


def test_a_malformed_manifest_is_a_failed_check_of_its_entry_not_a_traceback(tmp_path: Path, fixture_images) -> None:  # type: ignore[no-untyped-def]
    """One entry whose manifest had a list where an object belongs made `dermq model list` end in a
    traceback, showing no entry at all; and a malformed known-answer record made `dermq model verify`
    end in one instead of saying which check failed."""
    odd = _tiny_entries(tmp_path / "registry", fixture_images["ISIC_0024313"])
    listing = (
        "import sys; from pathlib import Path; from ml import registry; import cli.main; "
        "registry.REGISTRY_DIR = Path(sys.argv[1]); sys.exit(cli.main.main(['model', 'list', *sys.argv[2:]]))"
    )
    for extra in ([], ["--json"]):
        listed = subprocess.run(
            [sys.executable, "-c", listing, str(tmp_path / "registry"), *extra],
            capture_output=True,
            text=True,
            cwd=support.ROOT,
            timeout=120,
        )
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        assert "good-v1" in listed.stdout and "odd-v1" in listed.stdout
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert len(rows["good-v1"]["weights_sha256"]) == 64 and rows["odd-v1"]["balanced_accuracy"] is None
    verified = subprocess.run(
        [*support.DERMQ, "model", "verify", str(odd)], capture_output=True, text=True, cwd=support.ROOT, timeout=300
    )
    assert verified.returncode == 1 and "Traceback" not in verified.stderr, verified.stderr
    assert "FAIL  known answer: the manifest's verification record is malformed" in verified.stdout
    assert "MODEL FAILED VERIFICATION" in verified.stdout


def test_model_list_reports_the_backend_auto_serves_on_this_host_without_torch(tmp_path: Path) -> None:
    """`model list --json` gave the manifest's serving.default_backend as the entry's default, which is not
    what auto serves where the int8 figures were measured on another class of CPU, nor on a GPU."""
    from ml import backend_choice, registry

    graphs = {"onnx_fp32": {"path": "model.onnx", "sha256": "a" * 64}, "onnx_int8": {"path": "m", "sha256": "b" * 64}}
    for name, kernel in (("int8-elsewhere", "another-cpu"), ("int8-here", backend_choice.int8_kernel())):
        (tmp_path / name).mkdir()
        serving = {"default_backend": "onnx-int8", "int8_kernel": kernel, "onnx_int8_sha256": "b" * 64}
        manifest = {"schema_version": registry.SCHEMA_VERSION, "files": graphs, "serving": serving}
        registry.write_json_atomic(tmp_path / name / registry.MANIFEST, manifest)
    listing = (
        "import sys; sys.modules['torch'] = None; from pathlib import Path; from ml import registry; import cli.main; "
        "registry.REGISTRY_DIR = Path(sys.argv[1]); sys.exit(cli.main.main(['model', 'list', '--json']))"
    )
    served = {}
    for device in ("cpu", "cuda"):
        listed = subprocess.run(
            [sys.executable, "-c", listing, str(tmp_path)],
            capture_output=True,
            text=True,
            cwd=support.ROOT,
            timeout=120,
            env={**os.environ, "DERMQ_DEVICE": device},
        )
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        rows = json.loads(listed.stdout)
        assert {row["manifest_default_backend"] for row in rows} == {"onnx-int8"}
        served[device] = {row["id"]: row["default_backend"] for row in rows}
    assert served["cpu"] == {"int8-elsewhere": "onnx", "int8-here": "onnx-int8"}
    assert served["cuda"] == {"int8-elsewhere": "torch", "int8-here": "torch"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "Usage: dermq"),
        (["clinik", "list"], "No such command 'clinik'"),
        (["key"], "Usage: dermq key"),
        (["key", "create", "--role", "root"], "'root' is not one of 'clinic', 'auditor', 'admin'"),
        (["drift", "report", "--day", "yesterday"], "'yesterday' does not match the format '%Y-%m-%d'"),
        (["drift", "report", "--day", "9999-12-31"], "too close to the calendar's ends"),  # was a traceback
        (["drift", "report", "--day", "0001-01-01"], "too close to the calendar's ends"),
        (["keys", "rotate", "--batch", "0"], "0 is not in the range x>=1"),
        (["clinic", "create"], "Missing argument 'NAME'"),
    ],
)
def test_usage_errors_exit_2_with_a_message_and_no_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process: these fail while parsing, before any setting or database is read.
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err and out == ""


@pytest.mark.usefixtures("database")
def test_clinic_and_key_json_shapes_and_the_cli_actor(settings, keyring) -> None:  # type: ignore[no-untyped-def]
    from core import keys

    name = f"shape-{uuid.uuid4().hex[:6]}"
    made = run(settings, "clinic", "create", name, "--json")
    assert made.returncode == 0, made.stderr
    clinic = json.loads(made.stdout)
    assert set(clinic) == {"id", "name"} and clinic["name"] == name and uuid.UUID(clinic["id"])

    created = run(settings, "key", "create", "--clinic", name, "--role", "clinic", "--label", "front desk", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert set(key) == {"key", "id", "role"} and key["role"] == "clinic" and TOKEN_RE.match(key["key"])
    with session_scope(settings) as session:
        principal = keys.authenticate(session, keyring, key["key"])
        assert principal.key_id == uuid.UUID(key["id"]) and principal.clinic_id == uuid.UUID(clinic["id"])
        actors = set(
            session.scalars(select(AuditEvent.actor_type).where(AuditEvent.entity_id.in_([clinic["id"], key["id"]])))
        )
    assert actors == {"cli"}

    listed = json.loads(run(settings, "key", "list", "--clinic", name, "--json").stdout)
    assert [(k["id"], k["label"], k["revoked_at"]) for k in listed] == [(key["id"], "front desk", None)]
    assert key["key"] not in json.dumps(listed)
    with session_scope(settings) as session:  # listed as the API's listing is: audited, by the operator
        lists = session.scalars(
            select(AuditEvent.actor_type).where(
                AuditEvent.action == "key.list", AuditEvent.clinic_id == uuid.UUID(clinic["id"])
            )
        ).all()
    assert lists == ["cli"]

    # Without --json, stdout is the key alone (for `KEY=$(dermq key create ...)`), the rest on stderr.
    plain = run(settings, "key", "create", "--role", "auditor")
    assert plain.returncode == 0 and TOKEN_RE.match(plain.stdout.strip()) and len(plain.stdout.splitlines()) == 1
    assert "role auditor" in plain.stderr and plain.stdout.strip() not in plain.stderr
    assert "the auditor's secret store" in plain.stderr and "portal" not in plain.stderr  # no portal uses it

    clinics = json.loads(run(settings, "clinic", "list", "--json").stdout)
    assert {"id": clinic["id"], "name": name, "active": True} in [
        {k: c[k] for k in ("id", "name", "active")} for c in clinics
    ]
    text = run(settings, "clinic", "create", f"plain-{uuid.uuid4().hex[:6]}")
    assert text.stdout.startswith("id: ") and "\nname: plain-" in text.stdout


def test_model_list_marks_the_active_entry_with_a_leading_star(settings) -> None:  # type: ignore[no-untyped-def]
    from ml import registry

    entries = sorted(folder.name for folder, _, _ in registry.entries())
    assert len(entries) >= 2, "the check needs an active and an inactive entry"
    for active in entries[:2]:
        listed = run(settings, "model", "list", DERMQ_MODEL=active)
        assert listed.returncode == 0, listed.stderr
        lines = {line[2:].split()[0]: line for line in listed.stdout.splitlines()}
        assert set(lines) == set(entries)
        assert lines[active].startswith(f"* {active}  v")
        assert lines[active].endswith(f"  manifest sha256 {registry.manifest_sha256(active)}")  # what a deployment pins
        assert all(line.startswith("  ") for entry, line in lines.items() if entry != active)
    missing = run(settings, "model", "list", DERMQ_MODEL="no-such-model")
    assert missing.returncode == 0 and not any(line.startswith("*") for line in missing.stdout.splitlines())
    assert "(DERMQ_MODEL=no-such-model is not in the registry)" in missing.stdout


@pytest.mark.usefixtures("database")
def test_demo_creates_the_clinic_key_once_and_points_at_its_own_image(settings, keyring, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import core
    from core import clinics, keys
    from core.demo import DEMO_IMAGE

    clinic = f"demo-{uuid.uuid4().hex[:6]}"
    key_file = tmp_path / "state" / "demo-key"
    first = run(settings, "demo", "--clinic", clinic, "--key-file", str(key_file), DERMQ_ENVIRONMENT="development")
    assert first.returncode == 0, first.stderr
    token = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert first.stdout.startswith(f"created demo clinic '{clinic}' key (kept in {key_file}):")
    assert f"  {token}\n" in first.stdout and f"-F image=@{DEMO_IMAGE} " in first.stdout
    # the console refuses this clinic key (403): the line naming it says which key it takes
    assert "/audit/ takes an auditor key instead: .venv/bin/dermq key create --role auditor" in first.stdout
    # The image ships with the package (core/demo_data): production code never reads tests/.
    assert DEMO_IMAGE.is_file() and DEMO_IMAGE.read_bytes()[:3] == b"\xff\xd8\xff"
    assert DEMO_IMAGE.resolve().is_relative_to(Path(core.__file__).resolve().parent)
    with session_scope(settings) as session:
        principal = keys.authenticate(session, keyring, token)
    assert principal.role == Role.CLINIC and principal.clinic_id is not None

    second = run(settings, "demo", "--clinic", clinic, "--key-file", str(key_file), DERMQ_ENVIRONMENT="development")
    assert second.returncode == 0 and second.stdout.startswith("reusing demo clinic")
    assert f"  {token}\n" in second.stdout and key_file.read_text().strip() == token
    # a key the database no longer takes (made anew, the key revoked) is replaced, not printed to get 401
    with session_scope(settings) as session:
        session.execute(update(ApiKey).where(ApiKey.id == principal.key_id).values(revoked_at=func.now()))
    third = run(settings, "demo", "--clinic", clinic, "--key-file", str(key_file), DERMQ_ENVIRONMENT="development")
    assert third.returncode == 0 and third.stdout.startswith("created demo clinic"), third.stdout + third.stderr
    assert key_file.read_text().strip() != token
    with session_scope(settings) as session:  # the developer deactivated it: no new key could be made
        clinics.set_active(session, principal.clinic_id, False)
    fourth = run(settings, "demo", "--clinic", clinic, "--key-file", str(key_file), DERMQ_ENVIRONMENT="development")
    assert fourth.returncode == 0 and fourth.stdout.startswith("reusing demo clinic"), fourth.stdout + fourth.stderr


def test_keys_init_creates_a_private_key_file_once(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "new-keys.json"
    first = run(settings, "keys", "init", "--file", str(path))
    assert first.returncode == 0 and first.stdout.startswith(f"created key file {path} (mode 0600)")
    assert path.stat().st_mode & 0o777 == 0o600
    # the period-key folder beside it: the services that seal never create it (core/period_keys.py)
    assert f"created the period-key folder {tmp_path / 'period-keys'} (mode 0700)" in first.stdout
    assert (tmp_path / "period-keys").stat().st_mode & 0o777 == 0o700
    content = path.read_text()
    second = run(settings, "keys", "init", "--file", str(path))
    assert second.returncode == 0 and "exists; leaving it alone" in second.stdout and path.read_text() == content
    assert "period-key folder" not in second.stdout


@pytest.mark.usefixtures("database")
def test_key_list_shows_each_keys_clinic_and_revoke_takes_the_prefix_it_prints(settings) -> None:  # type: ignore[no-untyped-def]
    # a name past the 24 characters the list once cut names to: two such clinics read as one
    name = f"Northside Dermatology Clinic East {uuid.uuid4().hex[:6]}"
    assert run(settings, "clinic", "create", name).returncode == 0
    key = json.loads(run(settings, "key", "create", "--clinic", name, "--role", "clinic", "--json").stdout)
    listed = run(settings, "key", "list", "--clinic", name).stdout.splitlines()
    assert listed[0].split()[:5] == ["ID", "KEY", "ROLE", "CLINIC", "STATE"]
    (row,) = [line for line in listed[1:] if line.startswith(key["id"])]
    assert name in row and "active" in row
    printed = row.split()[1]  # dq_<prefix>_...
    revoked = run(settings, "key", "revoke", printed)
    assert revoked.returncode == 0 and key["id"] in revoked.stdout
    after = run(settings, "key", "list", "--clinic", name).stdout.splitlines()
    assert "revoked" in next(line for line in after if line.startswith(key["id"]))
    other = json.loads(run(settings, "key", "create", "--clinic", name, "--role", "clinic", "--json").stdout)
    assert run(settings, "clinic", "deactivate", name).returncode == 0  # its keys stop working: said so
    refused = next(
        line
        for line in run(settings, "key", "list", "--clinic", name).stdout.splitlines()
        if line.startswith(other["id"])
    )
    assert "clinic inactive" in refused


@pytest.mark.usefixtures("database")
def test_db_upgrade_says_what_it_did(settings) -> None:  # type: ignore[no-untyped-def]
    answer = run(settings, "db", "upgrade")
    assert answer.returncode == 0 and "latest revision" in answer.stdout and "nothing to do" in answer.stdout


def test_demo_is_refused_in_production(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A demo clinic with a live key, printed and left in a file, has no place in production; the
    refusal comes before the database is reached (this one names none that exists)."""
    key_file = tmp_path / "demo-key"
    refused = run(
        settings,
        "demo",
        "--key-file",
        str(key_file),
        DERMQ_ENVIRONMENT="production",
        DERMQ_DATABASE_URL="postgresql+psycopg2:///dermq_nowhere?host=/var/run/postgresql",
    )
    assert refused.returncode == 2 and "refused in production" in refused.stderr, refused.stdout + refused.stderr
    assert not key_file.exists()
