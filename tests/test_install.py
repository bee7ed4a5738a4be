"""One installed namespace: after `pip install` (editable, and a built wheel) into a fresh virtual
environment, `solo.*` imports, the stage folders' bare names (`model`, `train`, ...) do not, and a
user's own train.py / model.py in the working directory changes nothing.

The fresh environments reuse this one's dependencies through a .pth file that lists its
site-packages: a path line in a .pth adds the folder without running the .pth files inside it, so
this environment's own editable solo stays invisible there.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("model", "objectives", "data", "train", "agent", "experiments")
SHADOWS = {  # a user's own modules with the stage names, in the working directory
    "train.py": "raise SystemExit('the local train.py was imported')\n",
    "model.py": "raise SystemExit('the local model.py was imported')\n",
}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, cwd=ROOT,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    Path(inner, "_outer_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module", params=["editable", "wheel"])
def installed(request, tmp_path_factory):
    """A fresh venv with solo installed one way; returns (python, the folder solo comes from)."""
    tmp = tmp_path_factory.mktemp(request.param)
    python = _fresh_venv(tmp / "venv")
    target = ["--python", str(python), "install", "--no-deps", "--no-index",
              "--no-build-isolation"]
    if request.param == "editable":
        _pip(*target, "-e", str(ROOT))
        return python, ROOT
    # built from a copy: an in-tree build would leave build/ behind and reuse it next time
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "runs", "__pycache__", ".*cache", ".venv"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("solo-*.whl")
    _pip(*target, str(wheel))
    return python, tmp / "venv"


def test_solo_imports_and_the_bare_stage_names_do_not(installed, tmp_path):
    python, home = installed
    r = _run(python, "import solo, solo.model, solo.train.loop, solo.agent.server, "
                     "solo.experiments; print(solo.__file__); "
                     "print(' '.join(solo.experiments.available()))", tmp_path)
    assert r.returncode == 0, r.stderr
    where, experiments = r.stdout.splitlines()
    assert Path(where).resolve().is_relative_to(home.resolve()), where
    assert "tiny" in experiments.split() and "base" not in experiments.split()
    for name in STAGES:
        r = _run(python, f"import {name}", tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stdout)


def test_a_users_train_py_and_model_py_change_nothing(installed, tmp_path):
    python, _ = installed
    for name, text in SHADOWS.items():
        (tmp_path / name).write_text(text)
    r = _run(python, "import sys; from solo.cli import main; sys.exit(main(["
                     "'train', 'tiny', '--workdir', 'run', '--config.train.steps=2', "
                     "'--config.train.eval_batches=1', '--config.data.world.num_people=10']))",
             tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval:" in r.stdout and (tmp_path / "run" / "config.json").exists()
