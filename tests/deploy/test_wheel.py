"""The wheel the images install: it ships the migrations where the installed `dermq db upgrade` finds
them, the CLI and the demo image where `dermq demo` points, and the API image proves the migrations
from its installed packages, not from the source tree it was built from."""

from __future__ import annotations

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
