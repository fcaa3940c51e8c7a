"""The Dockerfiles and .dockerignore: multi-stage, non-root, health checks, nothing secret in the
build context, an API image without torch that still runs every process started from it, and a
wheel that ships the migrations where the installed `dermq db upgrade` finds them (and the demo image
where `dermq demo` points)."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy import manifests as m


def _load_script(name: str):  # type: ignore[no-untyped-def]
    """A script of deploy/docker/ as a module (they are not packages; the images run them by path)."""
    spec = importlib.util.spec_from_file_location(f"dermq_deploy_{name}", m.DEPLOY / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pyproject_deps = _load_script("pyproject_deps")

FIRST_PARTY = ("api", "core", "ml", "worker", "cli", "migrations")


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("kind", sorted(m.DOCKERFILES))
def test_dockerfile_is_multi_stage_and_copies_only_the_build_into_the_runtime(kind: str) -> None:
    instructions = m.dockerfile_instructions(m.DOCKERFILES[kind])
    stages = [i for i in instructions if i.keyword == "FROM"]
    assert len(stages) >= 2, "builder and runtime stages"
    assert " AS builder" in stages[0].args and " AS runtime" in stages[-1].args
    final = stages[-1].stage
    copies = [i.args for i in instructions if i.stage == final and i.keyword == "COPY"]
    assert any(c.startswith("--from=builder /opt/venv") for c in copies)
    for copy in copies:
        if not copy.startswith("--from="):
            assert copy.split()[0].startswith("deploy/docker/"), f"runtime stage copies {copy} from the context"


@pytest.mark.parametrize("kind", sorted(m.DOCKERFILES))
def test_runtime_runs_as_a_non_root_user_with_a_health_check(kind: str) -> None:
    instructions = m.dockerfile_instructions(m.DOCKERFILES[kind])
    final = max(i.stage for i in instructions)
    users = [i.args for i in instructions if i.stage == final and i.keyword == "USER"]
    assert users, "the runtime stage must switch user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root USER (Kubernetes runAsNonRoot checks the number)"
    pod_uids = {w.pod["securityContext"]["runAsUser"] for w in m.workloads()}
    assert pod_uids == {int(uid)}, "Kubernetes runs the pods as the image's user"
    healthchecks = [i for i in instructions if i.stage == final and i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0].args
    assert any(i.keyword == "CMD" for i in instructions if i.stage == final)


@pytest.mark.parametrize("kind", sorted(m.DOCKERFILES))
def test_no_secret_is_baked_into_an_image(kind: str) -> None:
    instructions = m.dockerfile_instructions(m.DOCKERFILES[kind])
    for instruction in instructions:
        if instruction.keyword in ("COPY", "ADD"):
            sources = [s for s in instruction.args.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert not re.search(r"(^|/)(var|secrets?)(/|$)|\.pem$|\.key$|keys?\.json$|\.env$", source), source
        if instruction.keyword in ("ENV", "ARG"):
            for name in re.findall(r"\b[A-Z0-9_]+(?==)", instruction.args):
                assert not m.looks_secret(name), f"{kind}: {name} baked into the image"
    env = m.dockerfile_runtime_env(m.DOCKERFILES[kind])
    assert env["DERMQ_KEY_FILE"].startswith("/run/secrets/"), "the key file is mounted at run time"
    assert env["DERMQ_SECRETS_DIR"] == "/run/secrets"


def test_worker_image_can_reach_the_gpu() -> None:
    env = m.dockerfile_runtime_env(m.DOCKERFILES["worker"])
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert env["DERMQ_DEVICE"] == "auto", "CUDA when present, otherwise the CPU"


def test_worker_health_check_pings_its_own_celery_node() -> None:
    instructions = m.dockerfile_instructions(m.DOCKERFILES["worker"])
    (check,) = [i.args for i in instructions if i.keyword == "HEALTHCHECK"]
    assert "-A worker.celery_app inspect ping" in check
    assert '--destination "celery@$HOSTNAME"' in check, "only this container's node, not any worker"


def test_healthcheck_script_defaults_match_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import Settings

    healthcheck = _load_script("healthcheck")
    for variable in ("DERMQ_API_PORT", "DERMQ_FLOWER_PORT", "DERMQ_TLS_CERTFILE"):
        monkeypatch.delenv(variable, raising=False)
    assert healthcheck.health_url("api") == f"http://127.0.0.1:{Settings.model_fields['api_port'].default}/healthz"
    assert healthcheck.health_url("flower").endswith(f":{Settings.model_fields['flower_port'].default}/healthcheck")
    monkeypatch.setenv("DERMQ_TLS_CERTFILE", "/run/secrets/api.crt")
    monkeypatch.setenv("DERMQ_API_PORT", "8443")
    assert healthcheck.health_url("api") == "https://127.0.0.1:8443/healthz"
    for kind in m.DOCKERFILES:
        copies = [i.args for i in m.dockerfile_instructions(m.DOCKERFILES[kind]) if i.keyword == "COPY"]
        checks = [i.args for i in m.dockerfile_instructions(m.DOCKERFILES[kind]) if i.keyword == "HEALTHCHECK"]
        if "/opt/dermq/healthcheck.py" in " ".join(checks):
            assert "deploy/docker/healthcheck.py /opt/dermq/healthcheck.py" in copies


# --------------------------------------------------------------------------- the migrations ship in the wheel
# `dermq db upgrade` runs Alembic on the installed `migrations` package (cli.db.alembic_config, no
# alembic.ini): the wheel must carry env.py, script.py.mako and versions/*.py, and the API image
# must prove that from its installed packages, not from the source tree it was built from.

MIGRATIONS = m.ROOT / "migrations"


def _revisions(script_location: Path) -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(script_location))
    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


def _project_install_run() -> str:
    (run,) = [
        i.args
        for i in m.dockerfile_instructions(m.DOCKERFILES["api"])
        if i.keyword == "RUN" and "pip install --no-deps ." in i.args
    ]
    return run


def test_pyproject_ships_the_migrations_package_with_its_data() -> None:
    setuptools = m.pyproject()["tool"]["setuptools"]
    assert (MIGRATIONS / "__init__.py").is_file(), "migrations must be a package to be found and shipped"
    assert any(fnmatch.fnmatchcase("migrations", p) for p in setuptools["packages"]["find"]["include"])
    package_data = setuptools["package-data"]["migrations"]
    data = [MIGRATIONS / "script.py.mako", *sorted((MIGRATIONS / "versions").glob("*.py"))]
    assert len(data) > 1, "no migrations/versions/*.py to ship"
    for path in data:
        relative = path.relative_to(MIGRATIONS).as_posix()
        assert any(fnmatch.fnmatchcase(relative, p) for p in package_data), (
            f"migrations/{relative} is not package data: the wheel would lack it"
        )


def test_the_cli_points_alembic_at_the_migrations_package() -> None:
    import migrations
    from cli.db import alembic_config

    config = alembic_config("postgresql+psycopg2://dermq:placeholder@postgres:5432/dermq")
    location = Path(config.get_main_option("script_location")).resolve()
    assert location == Path(migrations.__file__).resolve().parent
    assert (location / "env.py").is_file() and config.config_file_name is None, "no alembic.ini needed"
    assert _revisions(location), "Alembic finds no revision there"


def test_api_image_checks_the_installed_migrations_from_outside_the_source_tree() -> None:
    run = _project_install_run()
    assert "alembic.ini" not in run and "cp -r migrations" not in run, "the wheel ships the migrations now"
    steps = run.split(" && ")
    checks = [i for i, step in enumerate(steps) if step.startswith("python -c") and "migrations" in step]
    assert checks, "the API image must prove that the installed CLI finds its migrations"
    leave_source = [i for i, step in enumerate(steps) if re.fullmatch(r"cd /(?!src\b)\S*", step.strip())]
    assert leave_source and leave_source[0] < checks[0], "run the checks outside /src, where `import` finds the sources"
    text = " ".join(steps[i] for i in checks)
    for needed in ("alembic_config(", "env.py", "versions/*.py"):
        assert needed in text, f"the image's migration check lacks {needed}"


def _copy_sources(destination: Path) -> Path:
    """What `pip install .` in the builder sees: pyproject.toml, the readme and the packages."""
    destination.mkdir()
    project = m.pyproject()
    for name in ("pyproject.toml", project["project"].get("readme", "README.md")):
        shutil.copy2(m.ROOT / name, destination / name)
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", "*.work")
    for path in m.ROOT.iterdir():
        if (
            path.is_dir()
            and (path / "__init__.py").is_file()
            and any(fnmatch.fnmatchcase(path.name, p) for p in include)
        ):
            shutil.copytree(path, destination / path.name, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The project's wheel, built offline from a copy of the sources, and installed into a fresh
    virtualenv (its dependencies come from this one): (wheel, that venv's python, its purelib)."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(tmp / "src")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(source)]
    subprocess.run(pip, check=True, cwd=tmp, timeout=300)
    (wheel,) = (tmp / "dist").glob("dermq-*.whl")

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    python = next(p for p in (tmp / "venv" / "bin" / "python", tmp / "venv" / "Scripts" / "python.exe") if p.exists())
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(purelib)
    # This environment's site-packages for the dependencies; a plain path line, so the .pth files
    # there (the editable install of the sources) are not processed.
    dependencies = Path(importlib.util.find_spec("alembic").origin).parents[1]  # type: ignore[arg-type, union-attr]
    (purelib / "zz_dermq_test_dependencies.pth").write_text(f"{dependencies}\n")
    return wheel, python, purelib


def _run_installed(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERMQ_", "PYTHON"))}
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_ships_the_migrations(installed_wheel: tuple[Path, Path, Path]) -> None:
    wheel, _, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"migrations/__init__.py", "migrations/env.py", "migrations/script.py.mako"}
    expected |= {f"migrations/versions/{p.name}" for p in (MIGRATIONS / "versions").glob("*.py")}
    assert len(expected) > 3 and expected <= names, f"the wheel lacks {sorted(expected - names)}"
    assert "alembic.ini" not in names


def test_the_wheel_ships_the_cli_and_the_demo_image(installed_wheel: tuple[Path, Path, Path], tmp_path: Path) -> None:
    wheel, python, purelib = installed_wheel
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    expected = {f"cli/{p.name}" for p in (m.ROOT / "cli").glob("*.py")} | {"core/demo_data/ISIC_0024313.jpg"}
    assert {"cli/__main__.py", "cli/main.py"} <= expected <= names, f"the wheel lacks {sorted(expected - names)}"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "dermq = cli.main:main" in archive.read(entry_points).decode().splitlines()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERMQ_", "PYTHON"))}
    helped = subprocess.run(
        [str(python), "-m", "cli", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: dermq "), helped.stderr
    result = _run_installed(python, "import core.demo; print(core.demo.DEMO_IMAGE)", tmp_path)
    assert result.returncode == 0, result.stderr
    image = Path(result.stdout.strip())
    assert image.resolve().is_relative_to(purelib.resolve()) and image.is_file(), "`dermq demo` points at no image"


def test_the_installed_cli_finds_every_migration(installed_wheel: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, python, purelib = installed_wheel
    code = (
        "import cli.db, migrations; from alembic.script import ScriptDirectory; "
        "config = cli.db.alembic_config('postgresql+psycopg2://dermq:placeholder@postgres:5432/dermq'); "
        "print(cli.db.__file__); print(config.get_main_option('script_location')); "
        "print(' '.join(s.revision for s in ScriptDirectory.from_config(config).walk_revisions()))"
    )
    result = _run_installed(python, code, tmp_path)
    assert result.returncode == 0, result.stderr
    cli_file, location, revisions = result.stdout.splitlines()
    assert Path(cli_file).resolve().is_relative_to(purelib.resolve()), "the test ran the sources, not the wheel"
    assert Path(location).resolve() == purelib.resolve() / "migrations"
    assert (Path(location) / "env.py").is_file()
    assert set(revisions.split()) == _revisions(MIGRATIONS), "the installed package lacks revisions"


def test_the_api_image_migration_checks_pass_on_the_wheel_and_catch_missing_revisions(
    installed_wheel: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    # The Dockerfile's own check commands, run against the wheel installed in a virtualenv.
    _, python, purelib = installed_wheel
    checks = [
        shlex.split(step)[2]
        for step in _project_install_run().split(" && ")
        if step.startswith("python -c") and "migrations" in step
    ]
    for code in checks:
        result = _run_installed(python, code, tmp_path)
        assert result.returncode == 0, result.stderr
    versions = purelib / "migrations" / "versions"
    hidden = tmp_path / "versions"
    versions.rename(hidden)
    try:
        failures = [_run_installed(python, code, tmp_path).returncode for code in checks]
    finally:
        hidden.rename(versions)
    assert any(failures), "the image's checks would pass with no migrations/versions installed"


# --------------------------------------------------------------------------- the API image leaves out the ML stack


def test_ml_only_list_names_real_dependencies() -> None:
    requirements = pyproject_deps.requirements(m.ROOT / "pyproject.toml", "api")
    names = {pyproject_deps.requirement_name(spec) for spec in requirements}
    assert "torch" not in names and "fastapi" in names and "celery" in names
    everything = pyproject_deps.requirements(m.ROOT / "pyproject.toml", "worker")
    assert everything == m.pyproject()["project"]["dependencies"]
    assert len(everything) == len(requirements) + len(pyproject_deps.ML_ONLY)


def _module_path(module: str) -> Path | None:
    parts = module.split(".")
    base = m.ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str, module_level_only: bool) -> set[str]:
    """Absolute module names imported by a file: at module level, or anywhere in it."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if not (module_level_only and nested):
                if isinstance(child, ast.Import):
                    found.update(alias.name for alias in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join([*anchor, base] if base else anchor)
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


#: CLI modules whose commands need ml (torch, numpy): only the worker image runs them.
WORKER_IMAGE_COMMANDS = ("cli.models", "cli.drift")


def _third_party_reached(roots: list[str]) -> dict[str, str]:
    """Third-party top-level modules reachable from roots -> the first-party module importing them.

    api/, core/ and cli/ are followed into function bodies too (they run in the API image); worker/,
    ml/ and the CLI's model and drift commands at module level only (worker.runtime imports torch
    lazily, in the worker alone; `dermq model` and `dermq drift` load ml inside the command and run
    from the worker image).
    """
    seen: set[str] = set()
    reached: dict[str, str] = {}
    stack = list(roots)
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_path(module)
        if path is None:
            continue
        parents = module.split(".")
        stack.extend(".".join(parents[:i]) for i in range(1, len(parents)))
        module_level_only = parents[0] in ("worker", "ml") or module in WORKER_IMAGE_COMMANDS
        for name in _imports(path, module, module_level_only):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                stack.append(name)
            elif top and top not in sys.stdlib_module_names:
                reached.setdefault(top, module)
    return reached


def _api_image_roots() -> list[str]:
    roots = ["api.app", "cli.main", "worker.flower", "worker.celery_app", "worker.tasks", "migrations.env"]
    roots += [f"migrations.versions.{p.stem}" for p in (m.ROOT / "migrations" / "versions").glob("*.py")]
    return roots


def test_processes_of_the_api_image_never_import_the_ml_stack() -> None:
    distributions = importlib.metadata.packages_distributions()
    offenders = {}
    for top, importer in _third_party_reached(_api_image_roots()).items():
        for distribution in distributions.get(top, [top]):
            if pyproject_deps.canonical(distribution) in pyproject_deps.ML_ONLY:
                offenders[top] = importer
    assert not offenders, f"the API image has no {sorted(offenders)}; imported by {offenders}"


def _installed_closure(specs: list[str]) -> set[str]:
    """Canonical names of the distributions pip installs for specs (as far as this environment knows)."""
    from packaging.requirements import Requirement

    extras_of: dict[str, set[str]] = {}
    stack = [Requirement(spec) for spec in specs]
    while stack:
        requirement = stack.pop()
        name = pyproject_deps.canonical(requirement.name)
        if name in extras_of and set(requirement.extras) <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | set(requirement.extras)
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in distribution.requires or []:
            dependency = Requirement(line)
            wanted = extras_of[name] or {""}
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in wanted):
                stack.append(dependency)
    return set(extras_of)


def test_the_api_image_installs_everything_its_processes_import() -> None:
    installed = _installed_closure(pyproject_deps.requirements(m.ROOT / "pyproject.toml", "api"))
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for top, importer in _third_party_reached(_api_image_roots()).items():
        names = distributions.get(top, [top])
        if not any(pyproject_deps.canonical(name) in installed for name in names):
            missing[top] = importer
    assert not missing, f"the API image would lack {missing}: add them to pyproject.toml's dependencies"


def test_the_import_walk_sees_torch_where_it_is() -> None:
    # The check above would pass vacuously if the walk missed imports: the worker's model runtime
    # must show up as importing torch when function bodies are followed.
    imports = _imports(m.ROOT / "worker" / "runtime.py", "worker.runtime", module_level_only=False)
    assert "torch" in imports
    reached = _third_party_reached(["api.app"])
    assert {"fastapi", "sqlalchemy", "redis"} <= set(reached)


def test_processes_of_the_api_image_find_their_console_scripts_installed() -> None:
    scripts = m.console_scripts()
    for name in ("dermq", "dermq-api", "dermq-flower"):
        module, _, function = scripts[name].partition(":")
        assert importlib.util.find_spec(module) is not None, name
        assert f"def {function}(" in (_module_path(module) or Path()).read_text(), name


# --------------------------------------------------------------------------- .dockerignore


def _dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in m.DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def excluded_from_build_context(path: str) -> bool:
    """Docker's .dockerignore semantics: last matching pattern wins; a match on a folder covers its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in _dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        "var/keys.json",
        "var/flower.db",
        ".venv/bin/python",
        ".git/config",
        ".env",
        ".env.production",
        "deploy/secrets/dermq_database_url",
        "deploy/secrets/dermq-keys.json",
        "deploy/secrets/tls.key",
        "deploy/k8s/secrets/dermq-secrets.template.yaml",
        "server.pem",
        "certs/tls.key",
        "ml/keys.json",
        "tests/fixtures/images/ISIC_0024306.jpg",
        "api/__pycache__/app.cpython-311.pyc",
        "run1.work/checkpoint.pt",
        "dermq.egg-info/PKG-INFO",
    ],
)
def test_secrets_state_and_test_data_stay_out_of_the_build_context(path: str) -> None:
    assert excluded_from_build_context(path), f"{path} would be sent to the Docker daemon"


def test_what_the_images_need_is_in_the_build_context() -> None:
    needed = [
        "pyproject.toml",
        "README.md",
        "migrations/env.py",
        "deploy/docker/pyproject_deps.py",
        "deploy/docker/healthcheck.py",
    ]
    for package in ("api", "core", "worker", "ml", "cli", "migrations"):
        needed += [str(p.relative_to(m.ROOT)) for p in (m.ROOT / package).rglob("*") if p.is_file()]
    needed = [p for p in needed if "__pycache__" not in p]
    assert any(p.endswith("weights.safetensors") for p in needed), "the shipped model is part of the image"
    missing = [p for p in needed if excluded_from_build_context(p)]
    assert not missing, f".dockerignore drops files the images need: {missing[:10]}"
