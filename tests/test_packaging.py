"""The package as a user meets it: `import ldm` and `ldm --help` import no torch (so they answer at once), the
subcommands still parse, and a wheel built from the repository installs into a fresh virtual environment and
generates an image with the bundled demo model, from any folder."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


HEAVY = ["torch", "transformers", "accelerate", "ldm.training.train", "ldm.data", "ldm.accel.optimize", "ldm.models.checkpoint"]


def test_import_ldm_imports_nothing_heavy_until_a_name_is_used():
    out = python(f"""
import sys, ldm
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
print(ldm.__version__, ldm.load.__module__, ldm.preset("tiny").name, 'torch' in sys.modules)
print('ldm.training.train' in sys.modules, 'ldm.data' in sys.modules)
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "0.1.0 ldm.models.checkpoint tiny True", "False False"]


@pytest.mark.parametrize("argv, code, shown", [
    (["--help"], 0, ["txt2img", "img2img", "info", "train", "cache-latents", "export",
                     "train or fine-tune a model", "write a training run's checkpoint"]),
    (["--version"], 0, ["ldm 0.1.0"]),
    (["txt2img", "--help"], 0, ["--negative-prompt", "--precision"]),
    (["txt2img", "a cat", "--W", "100"], 2, ["--width 100 is not a multiple of 8"]),
    (["txt2img", "a cat", "--sampler"], 2, ["expected one argument"]),
    (["txt2img", "a cat", "--sampler", "UniPC"], 2, ["unknown sampler 'UniPC'", "dpmpp_3m_sde", "'DPM++ 2M'"]),
    (["nope"], 2, ["invalid choice: 'nope'"]),
])
def test_help_and_argument_errors_import_no_torch(argv, code, shown):
    out = python(f"""
import sys
from ldm.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print("exit", code or 0, "torch" in sys.modules, file=sys.stderr)
""")
    *_, last = out.stderr.splitlines()
    assert last == f"exit {code} False", out.stderr
    for text in shown:
        assert text in out.stdout + out.stderr


def test_a_module_command_parses_its_own_arguments():
    out = python("from ldm.cli import main\nmain(['export', '--help'])")
    assert out.returncode == 0 and "--ema" in out.stdout and "run_dir" in out.stdout, out.stderr
    out = python("from ldm.cli import main\nmain(['export'])")
    assert out.returncode == 2 and "the following arguments are required: run_dir" in out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the repository (the build writes build/ and *.egg-info next to its sources)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ldm", src / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path, = out.glob("ldm-*.whl")
    return path


def test_the_wheel_holds_the_package_and_the_demo_model_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        demo = z.getinfo("ldm/demo/ldm-demo-shapes.safetensors")
    assert demo.file_size == (ROOT / "ldm/demo/ldm-demo-shapes.safetensors").stat().st_size
    assert {"ldm/__init__.py", "ldm/cli.py", "ldm/accel/cpu.py", "ldm/demo/__init__.py", "ldm/data/shapes.py"} <= set(names)
    assert not [n for n in names if not n.startswith(("ldm/", "ldm-0.1.0.dist-info/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "ldm = ldm.cli:main" in entry_points


def test_the_wheel_installed_in_a_fresh_venv_generates_with_the_bundled_model(wheel, tmp_path):
    """A new virtual environment gets the wheel from pip (no index); the dependencies come from this one through a
    .pth file (no registry here), whose own editable ldm is not seen there. Run from an empty folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fresh_site = Path(subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                      "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(bin_dir / "ldm"), "txt2img", "large red circle on the left, blue background",
                           "--steps", "3", "--seed", "1", "--quiet", "--outdir", "out"], capture_output=True,
                          text=True, cwd=work, env={**env, "LDM_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    png, = (work / "out").glob("*.png")
    assert (work / proc.stdout.strip()).resolve() == png.resolve()  # the path it prints, relative to where it ran
    from PIL import Image

    with Image.open(png) as im:
        params = json.loads(im.text["ldm"])
        assert im.size == (64, 64)
    assert Path(params["ckpt"]).resolve() == (fresh_site / "ldm/demo/ldm-demo-shapes.safetensors").resolve()
