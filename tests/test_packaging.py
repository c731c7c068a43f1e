"""Packaging: the wheel holds the package with the kernels and bench tools inside it (nothing at the top level but
``bam_triton``), declares the ``bam-triton`` console script, and ``python -m bam_triton --help`` works."""
import configparser
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Not copied into the build tree: environments, VCS data and build leftovers (a stale build/ would hide mistakes).
_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 ".hypothesis", "*.pyc")


def _missing_build_tooling():
    missing = [name for name in ("build", "setuptools", "wheel") if importlib.util.find_spec(name) is None]
    return f"wheel build tooling not installed: {', '.join(missing)} (pip install build setuptools wheel)" \
        if missing else None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the working tree (so the build never writes build/ or egg-info into the
    repository that other jobs use), without build isolation (no network)."""
    reason = _missing_build_tooling()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel):
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_name(wheel):
    assert wheel.name.startswith("bam_triton-0.1.0-") and wheel.name.endswith("-py3-none-any.whl")


@pytest.mark.parametrize("path", ["bam_triton/__init__.py", "bam_triton/__main__.py", "bam_triton/cli.py",
                                  "bam_triton/kernels/__init__.py", "bam_triton/kernels/_common.py",
                                  "bam_triton/kernels/apply.py", "bam_triton/kernels/pool.py",
                                  "bam_triton/bench/__init__.py"])
def test_wheel_contains(wheel_names, path):
    assert path in wheel_names, f"{path} missing from the wheel: {sorted(wheel_names)}"


def test_wheel_ships_every_kernel_and_bench_module(wheel_names):
    """Every .py file of kernels/ and bench/ in the tree is installed inside the package."""
    for folder, package in (("kernels", "bam_triton/kernels"), ("bench", "bam_triton/bench")):
        for f in (ROOT / folder).glob("*.py"):
            assert f"{package}/{f.name}" in wheel_names, f"{folder}/{f.name} not shipped as {package}/{f.name}"


def test_wheel_has_nothing_at_the_top_level_but_the_package(wheel_names):
    tops = {name.split("/", 1)[0] for name in wheel_names}
    for bad in ("kernels", "bench", "tests", "examples", "docs"):
        assert bad not in tops, f"top-level {bad}/ in the wheel"
        assert not any(name.startswith(f"{bad}/") for name in wheel_names)
    assert {t for t in tops if not t.endswith(".dist-info")} == {"bam_triton"}
    assert not any(name.endswith((".pyc", ".png", ".svg", ".csv")) for name in wheel_names)


def test_wheel_declares_the_console_script(wheel, wheel_names):
    (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    with zipfile.ZipFile(wheel) as z:
        parser.read_string(z.read(entry_points).decode())
    assert parser.has_section("console_scripts")
    assert parser["console_scripts"]["bam-triton"].strip() == "bam_triton.cli:main"
    (metadata,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
    with zipfile.ZipFile(wheel) as z:
        text = z.read(metadata).decode()
    assert "Name: bam-triton" in text and "Requires-Dist: torch" in text


def test_wheel_installs_and_imports(wheel, tmp_path):
    """Unpacked on its own (no repository on the path), the package imports, finds its kernels sub-package and
    exposes the console script's function."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BAM_TRITON_BACKEND")}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import bam_triton, bam_triton.cli, importlib.util; "
            "assert bam_triton.__file__.startswith(sys.argv[1]), bam_triton.__file__; "
            "assert importlib.util.find_spec('bam_triton.kernels').origin.startswith(sys.argv[1]); "
            "assert importlib.util.find_spec('bam_triton.bench').origin.startswith(sys.argv[1]); "
            "assert importlib.util.find_spec('kernels') is None or not importlib.util.find_spec('kernels')"
            ".origin.startswith(sys.argv[1]); "
            "assert callable(bam_triton.cli.main); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_python_m_bam_triton_help():
    env = {k: v for k, v in os.environ.items() if k != "BAM_TRITON_BACKEND"}
    proc = subprocess.run([sys.executable, "-m", "bam_triton", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: bam-triton" in proc.stdout
    for command in ("check", "sweep", "plot", "traffic", "inspect", "tune"):
        assert command in proc.stdout


def test_console_script_installed():
    """The editable install put a ``bam-triton`` script next to this interpreter; it answers --help."""
    script = pathlib.Path(sys.executable).parent / "bam-triton"
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed into this environment)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: bam-triton" in proc.stdout, proc.stderr
