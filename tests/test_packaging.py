"""A real install, as a user gets one: the wheel and the sdist built from this checkout's files, the wheel
installed (not -e) into a fresh virtual environment that reuses the installed dependencies (no network), and
captioner imported and run there from a folder outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, SMALL_MODEL

PACKAGE = ROOT / "captioner"


def _module_folders() -> list[Path]:
    return sorted({p.parent for p in PACKAGE.rglob("*.py")})


def test_every_folder_of_modules_is_a_package():
    """setuptools' find_packages leaves out a folder without __init__.py, and with it all its modules."""
    missing = [str(folder.relative_to(ROOT)) for folder in _module_folders() if not (folder / "__init__.py").is_file()]
    assert not missing, f"no __init__.py in {missing}: a wheel would leave them out"


# ---------------------------------------------------------------- build, install into a new venv


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def _clone(dest: Path) -> Path:
    """The files a clone would hold (git's list: tracked and new files, not ignored ones) copied to dest: the
    build writes its build/ and egg-info there, not into the checkout, and nothing stale gets into the wheel."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: cannot tell its files from build outputs")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _environment() -> dict:
    """This environment without this checkout on the path; one thread (2 shared cores), no pip self-check."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _reuse_packages(python: Path) -> None:
    """Put the running interpreter's site-packages folders on the new venv's path, after its own: a .pth file's
    plain lines are appended to sys.path, and the .pth files inside them (the editable captioner's) are not
    run, so the venv's own captioner comes first and the checkout's never enters."""
    own = _run([python, "-c", "import site; print(site.getsitepackages()[0])"], env=_environment()).stdout.strip()
    reused = [p for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")
              and Path(p) != Path(own)]
    (Path(own) / "captioner-test-reuse.pth").write_text("".join(p + "\n" for p in reused))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist, venv's python, a folder outside the checkout): built and installed once for this module."""
    work = tmp_path_factory.mktemp("packaging")
    source, dist, venv, outside = _clone(work / "source"), work / "dist", work / "venv", work / "elsewhere"
    env = _environment()
    # `pip install .` builds this wheel; --no-build-isolation: setuptools and wheel come from this environment.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist,
          source], cwd=work, env=env, timeout=600)
    # What `python -m build --sdist --no-isolation` runs: setuptools' PEP 517 hook, in the source folder.
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
          dist], cwd=source, env=env, timeout=600)
    (wheel,), (sdist,) = dist.glob("captioner-*.whl"), dist.glob("captioner-*.tar.gz")
    # The venv sees the installed torch, numpy, ... (and pip) but gets its own captioner, not the editable one.
    # Not `venv --system-site-packages`: run from inside a venv, that shows the base Python's packages, not the
    # running environment's (where torch may be the only one there is).
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env, timeout=300)
    python = venv / "bin" / "python"
    _reuse_packages(python)
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=work,
         env=env, timeout=600)
    outside.mkdir()
    return wheel, sdist, python, outside


def _packages() -> set[str]:
    """captioner's package folders in this checkout, as paths: captioner, captioner/engine, ..."""
    return {str(folder.relative_to(ROOT)) for folder in _module_folders()}


def _modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}


def _configs() -> set[str]:
    return {p.name for p in (ROOT / "configs").glob("*.yaml")}


@pytest.mark.slow
def test_wheel_and_sdist_hold_every_module_and_config(built):
    wheel, sdist, _, _ = built
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    assert {n for n in in_wheel if n.startswith("captioner/") and n.endswith(".py")} == _modules()  # none stale
    assert {f"captioner/configs/{name}" for name in _configs()} <= in_wheel
    assert "captioner/py.typed" in in_wheel  # type checkers use the package's hints (PEP 561)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in in_wheel)
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]  # captioner-0.1.0
        in_sdist = {n.removeprefix(f"{top}/") for n in t.getnames()}
    assert _packages() <= in_sdist and _modules() <= in_sdist
    assert {f"configs/{name}" for name in _configs()} <= in_sdist
    assert {"setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"} <= in_sdist


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import captioner
failed = {}
for module in pkgutil.walk_packages(captioner.__path__, "captioner."):
    if module.name.rsplit(".", 1)[-1] == "__main__":
        continue  # runs the command line
    try:
        importlib.import_module(module.name)
    except Exception as e:
        failed[module.name] = f"{type(e).__name__}: {e}"
print(json.dumps({"file": captioner.__file__, "version": captioner.__version__, "prefix": sys.prefix,
                  "modules": sorted(sys.modules), "failed": failed}))
"""


@pytest.mark.slow
def test_the_installed_wheel_imports_every_module_from_the_venv(built):
    _, _, python, outside = built
    done = _run([python, "-c", IMPORT_ALL], cwd=outside, env=_environment(), timeout=300)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    venv = python.parent.parent
    assert Path(found["prefix"]) == venv
    # the venv's own copy: not this checkout, not the editable install's checkout
    assert Path(found["file"]).is_relative_to(venv), found["file"]
    assert not found["failed"], found["failed"]
    expected = {m.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for m in _modules()}
    assert {m for m in expected if not m.endswith("__main__")} <= set(found["modules"])


@pytest.mark.slow
def test_the_installed_demo_runs_outside_the_checkout(built):
    """`captioner demo` from the venv's entry point, finding configs/tiny.yaml inside the installed package."""
    _, _, python, outside = built
    out = outside / "demo"
    tiny = ["dataset.synthetic_images=60", *SMALL_MODEL, "train.epochs=1", "train.batch_size=16",
            "train.num_workers=0", "compute.num_workers=0", "decode.max_len=8"]
    done = _run([python.parent / "captioner", "-q", "demo", "--out", out, "--device", "cpu", *tiny], cwd=outside,
                env=_environment(), timeout=600)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["output_dir"] == str(out) and Path(summary["checkpoint"]) == out / "run" / "best.pt"
    assert summary["test_images"] == 6 and 0 <= summary["bleu4"] <= 1
    for key in ("checkpoint", "metrics_file", "captions_file", "gallery_file"):
        assert Path(summary[key]).is_file(), key
    captions = [json.loads(line) for line in Path(summary["captions_file"]).read_text().splitlines()]
    assert len(captions) == 6 and all(c.get("caption") for c in captions)


@pytest.mark.slow
def test_configs_ship_inside_the_wheel(built, tmp_path):
    """`pip install .` (not -e): the wheel holds captioner/configs/*.yaml and the demo finds tiny.yaml there."""
    wheel = built[0]
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    assert (tmp_path / "site" / "captioner" / "configs" / "tiny.yaml").is_file()
    found = subprocess.run([sys.executable, "-c", "from captioner.config import shipped_config, load_config; "
                            "p = shipped_config('tiny.yaml'); print(p); print(load_config(p).encoder.arch)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert found.returncode == 0, found.stderr
    path, arch = found.stdout.split()
    assert Path(path) == tmp_path / "site" / "captioner" / "configs" / "tiny.yaml" and arch == "resnet18"
