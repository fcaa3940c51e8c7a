"""The Dockerfiles and .dockerignore: multi-stage, non-root, health checks, nothing secret in the
build context, and an API image without torch that still runs every process started from it (the
wheel they install: test_wheel)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
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


# --------------------------------------------------------------------------- the API image leaves out the ML stack


def test_ml_only_list_names_real_dependencies() -> None:
    requirements = pyproject_deps.requirements(m.ROOT / "pyproject.toml", "api")
    names = {pyproject_deps.requirement_name(spec) for spec in requirements}
    assert "torch" not in names and "fastapi" in names and "celery" in names
    everything = pyproject_deps.requirements(m.ROOT / "pyproject.toml", "worker")
    assert everything == m.pyproject()["project"]["dependencies"]
    assert len(everything) == len(requirements) + len(pyproject_deps.ML_ONLY)


def test_the_api_images_requirements_pull_in_none_of_the_ml_stack() -> None:
    """Leaving a distribution out of the list is not enough when another one requires it: onnxruntime
    brought numpy (and itself, the inference runtime) into the image that never runs the model. Walks
    the installed distributions' requirements, with the extras the API's requirements ask for."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted = [Requirement(spec) for spec in pyproject_deps.requirements(m.ROOT / "pyproject.toml", "api")]
    seen: dict[str, str] = {}  # distribution -> the one that required it
    queue = [(requirement, "pyproject.toml") for requirement in wanted]
    while queue:
        requirement, parent = queue.pop()
        name = pyproject_deps.canonical(requirement.name)
        if name in seen:
            continue
        seen[name] = parent
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:  # not installed here: nothing of it to follow
            continue
        for spec in requires:
            needed = Requirement(spec)
            extras = ["", *sorted(requirement.extras)]
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                queue.append((needed, name))
    pulled = {name: seen[name] for name in seen.keys() & pyproject_deps.ML_ONLY}
    assert not pulled, f"the API image would install {pulled} (distribution: required by)"
    assert {"fastapi", "celery", "kombu", "sqlalchemy", "pillow"} <= seen.keys()  # the walk went through them


def test_the_builders_check_finds_the_ml_stack_where_it_is_installed(capsys: pytest.CaptureFixture[str]) -> None:
    installed = pyproject_deps.installed_ml()
    assert pyproject_deps.main(["--check-absent"]) == (1 if installed else 0)
    err = capsys.readouterr().err
    assert all(name in err for name in installed)
    assert ("torch" in installed) == (importlib.util.find_spec("torch") is not None)  # the check sees what is here


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
        ".venv-peer/bin/python",  # bench.peer's BentoML environment
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
