"""The package as a user installs it: the wheel, in a fresh virtual environment that has torch.

Nothing here may depend on the checkout's layout: the wheel is installed into a new venv
and used from a directory outside the repository.
"""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import revnet

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd=None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def distribution_closure(name: str) -> list[importlib.metadata.Distribution]:
    """``name``'s installed distribution and those it requires, recursively (extras left out)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return list(seen.values())


def torch_site(folder: Path) -> Path:
    """A folder holding links to torch and its dependencies as this interpreter has them.

    A fresh venv gets it through a .pth file: the user's environment with torch already in
    it, without copying or downloading a gigabyte.
    """
    folder.mkdir()
    for dist in distribution_closure("torch"):
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (folder / top).exists():
                (folder / top).symlink_to(src)
    return folder


@pytest.mark.wheel
def test_the_wheel_installs_beside_torch_and_works_from_anywhere(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT)
    (wheel,) = dist.glob("revnet-*.whl")
    assert wheel.name.startswith(f"revnet-{revnet.__version__}-")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # The venv's own old setuptools would shadow the one torch requires (and brings).
    run(python, "-m", "pip", "uninstall", "-y", "-q", "setuptools")
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "torch-from-the-user.pth").write_text(str(torch_site(tmp_path / "user-site")) + "\n")
    torch_before = run(python, "-c", "import torch; print(torch.__version__, torch.__file__)").stdout

    # --no-index: with torch already there nothing else may be needed (no download, no CUDA build).
    run(python, "-m", "pip", "install", "--no-index", "-q", "--disable-pip-version-check", wheel)
    away = tmp_path / "elsewhere"
    away.mkdir()
    check = (
        "import sys, torch, revnet\n"
        "assert revnet.__file__.startswith(sys.prefix), revnet.__file__\n"
        "m = revnet.create_model('revnet38')\n"
        "m(torch.randn(2, 3, 32, 32)).sum().backward()\n"
        "print([n for n in ('numpy', 'tqdm', 'matplotlib') if n in sys.modules])\n"
        "import pathlib; print((pathlib.Path(revnet.__file__).parent / 'py.typed').is_file())\n"
    )
    out = run(python, "-c", check, cwd=away).stdout.splitlines()
    assert out == ["[]", "True"]  # the engine and the zoo need torch alone; typed
    assert run(python, "-c", "import torch; print(torch.__version__, torch.__file__)").stdout == torch_before
    assert run(bin_dir / "revnet", "--version", cwd=away).stdout.strip() == f"revnet {revnet.__version__}"
    models = run(bin_dir / "revnet", "models", cwd=away).stdout
    assert "revnet38" in models and "resnet32" in models
    # The training tools say which extra they need instead of failing on an import.
    proc = subprocess.run([bin_dir / "revnet", "train"], capture_output=True, text=True, cwd=away,
                          timeout=300)
    assert proc.returncode == 1 and "pip install 'revnet[train]'" in proc.stderr
