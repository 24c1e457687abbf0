"""The distribution: the wheel installs ``viewmw`` alone, and the worker is an optional extra.

The wheel is built from this checkout without a network (hatchling from the test extra, no build
isolation) and installed into a fresh venv whose only other path is this venv's site-packages
(for the dependencies), so what the wheel lacks cannot be found in the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import viewmw

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with no ``VIEWMW_*`` nor ``PYTHONPATH`` from the test's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_") and k != "PYTHONPATH"}
    env.update(extra_env)
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        out,
        ROOT,
        cwd=out,
    )
    (built,) = out.glob("viewmw-*.whl")
    return built


def test_the_wheel_holds_viewmw_alone(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    assert top_level == {"viewmw", f"viewmw-{viewmw.__version__}.dist-info"}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"viewmw/jobs/__init__.py", "viewmw/py.typed", "viewmw/lua/record_views.lua"} <= names
    assert {"viewmw/templates/stats_page.html", "viewmw/templates/stats_page.css"} <= names


def test_the_wheel_installs_into_a_fresh_venv_and_runs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        wheel,
        cwd=tmp_path,
    )
    purelib = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path
        ).stdout.strip()
    )
    installed = {p.name for p in purelib.iterdir()} - {"__pycache__", "_virtualenv.pth"}
    assert installed == {"viewmw", f"viewmw-{viewmw.__version__}.dist-info"}
    # The dependencies from this venv, after the fresh venv's own packages (a plain path line:
    # this venv's editable-install .pth is not processed, so the checkout stays out of reach).
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    check = run(
        python,
        "-c",
        "import sys, viewmw; print(viewmw.__file__); print('dramatiq' in sys.modules)\n"
        "import viewmw.jobs; print(viewmw.jobs.__file__)",
        cwd=tmp_path,
        VIEWMW_BROKER_URL="stub://",  # the worker imports without reaching a server
    )
    library, dramatiq_imported, worker = check.stdout.splitlines()
    assert library.startswith(str(purelib / "viewmw"))
    assert worker.startswith(str(purelib / "viewmw" / "jobs"))
    assert dramatiq_imported == "False"
    version = run(venv / "bin" / "viewmw", "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"viewmw {viewmw.__version__}"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in this venv, from the checkout; the caller checks the exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_importing_the_library_does_not_import_the_worker_extra() -> None:
    result = run_python(
        "import sys, viewmw, viewmw.cli, viewmw.health\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dramatiq', 'periodiq')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["dramatiq", "periodiq"])
def test_the_worker_without_its_extra_says_what_to_install(missing: str) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    result = run_python(f"import sys; sys.modules[{missing!r}] = None; import viewmw.jobs")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"ModuleNotFoundError: viewmw.jobs needs the worker extra ({missing} is not installed): "
        "pip install 'viewmw[worker]'"
    )
