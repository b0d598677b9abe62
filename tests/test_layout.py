"""The package's architecture, checked: imports point down the module map, and what needs what.

The map (docs/DESIGN.md, "Module map"): cli -> bench -> training -> models, memory,
fidelity -> engine, each part importing only the parts below it; ``engine`` imports nothing
else of revnet (so nothing that measures), and the engine, the memory tools, the fidelity
checks and the zoo need nothing but the standard library and torch.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "revnet"
# Each part, and the parts it may import. The top-level modules (__init__, __main__) may
# import anything; _version is a leaf every part may read.
MAY_IMPORT = {
    "engine": {"engine"},
    "memory": {"memory", "engine"},
    "fidelity": {"fidelity", "engine"},
    "models": {"models", "engine"},
    "conversion": {"conversion", "models", "fidelity", "engine"},
    "training": {"training", "conversion", "models", "memory", "fidelity", "engine"},
    "bench": {"bench", "training", "conversion", "models", "memory", "fidelity", "engine"},
    "cli": {"cli", "bench", "training", "conversion", "models", "memory", "fidelity", "engine"},
}
LEAVES = {"_version"}
EXTRAS = ("numpy", "tqdm", "matplotlib")  # the `train` extra


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file (functions included), absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` may name a submodule: count it as one.
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names] if not node.module else []
            found.append((node.lineno, target))
    return found


def part_of(module: str) -> str | None:
    """``revnet.engine.coupling`` -> ``engine``; None for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_tree_has_one_folder_per_part():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == set(MAY_IMPORT)
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "_version.py"}, "code belongs in a part's folder"


def test_imports_point_down_the_module_map():
    wrong = []
    for path in sources():
        me = part_of(module_name(path))
        if me is None:
            continue
        for line, target in imports(path):
            if target != "revnet" and not target.startswith("revnet."):
                continue
            leaf = target.split(".")[1] if "." in target else ""
            if leaf in LEAVES or leaf.startswith("_version"):
                continue
            other = part_of(target)
            if other not in MAY_IMPORT[me]:
                wrong.append(f"{path.relative_to(SRC)}:{line}: {me} imports {target}")
    assert not wrong, "imports against the module map:\n" + "\n".join(wrong)


def test_engine_memory_fidelity_models_and_conversion_need_only_torch():
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for path in sources():
        if part_of(module_name(path)) not in ("engine", "memory", "fidelity", "models", "conversion"):
            continue
        for line, target in imports(path):
            top = target.split(".")[0]
            if top not in stdlib and top not in ("torch", "revnet", "__future__"):
                wrong.append(f"{path.relative_to(SRC)}:{line}: imports {target}")
    assert not wrong, "\n".join(wrong)


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where numpy, tqdm and matplotlib cannot be imported."""
    block = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in EXTRAS)
    return subprocess.run([sys.executable, "-W", "ignore", "-c", block + code], capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})


def test_every_module_imports_and_the_cli_answers_without_the_train_extra():
    proc = run_without_extras(
        "import importlib, pkgutil, revnet\n"
        "names = [m.name for m in pkgutil.walk_packages(revnet.__path__, 'revnet.')\n"
        "         if m.name != 'revnet.__main__']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "model = revnet.create_model('revnet38')\n"
        "from revnet.cli import main\n"
        "assert main(['models']) == 0\n"
        "print(len(names), 'modules')\n"
        "main(['--version'])\n")
    assert proc.returncode == 0, proc.stderr
    assert "revnet38" in proc.stdout and "revnet 0.1.0" in proc.stdout


@pytest.mark.parametrize("argv", [["train", "--steps", "1"], ["bench", "speed", "--quick"], ["plot", "x"]])
def test_commands_that_need_the_train_extra_say_how_to_get_it(argv):
    proc = run_without_extras(f"from revnet.cli import main\nraise SystemExit(main({argv!r}))\n")
    assert proc.returncode == 1
    assert "needs numpy, tqdm, matplotlib" in proc.stderr and "pip install 'revnet[train]'" in proc.stderr


def test_training_and_revnet_train_stand_without_the_benchmarks():
    """Training is a library of its own: nothing in revnet.training, and nothing ``revnet train``
    runs, imports revnet.bench (the closing memory line is the run's own count: training.footprint)."""
    files = [*sorted((PACKAGE / "training").rglob("*.py")), PACKAGE / "cli" / "train.py"]
    wrong = [f"{path.relative_to(SRC)}:{line}: imports {target}" for path in files
             for line, target in imports(path) if f"{target}.".startswith("revnet.bench.")]
    assert not wrong, "\n".join(wrong)


# A test of a model's name standing in for what the model is: the name's prefix ("rev...",
# "vit..."; a dotted module path such as "revnet.engine." is not a model's name) or a fragment
# looked for in it. Ask the model instead: revnet.engine.has_reversible_units, models.model_accepts.
NAME_TESTS = re.compile(r"""startswith\(\s*["'](?:rev|resnet|vit)(?!\w*\.)"""
                        r"""|["'](?:vit|rev|revnet|revvit|resnet)_?["']\s+in\s""")


def test_no_module_learns_what_a_model_is_from_its_name():
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}" for path in sources()
             for n, line in enumerate(path.read_text().splitlines(), 1) if NAME_TESTS.search(line)]
    assert not found, "model names tested instead of asking the model:\n" + "\n".join(found)
