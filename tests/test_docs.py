"""The documentation site (mkdocs.yml): it builds with warnings as errors, documents every public
name, and its examples run.

- The build is ``mkdocs build --strict`` into a temporary folder: a broken link or anchor, a page
  missing from the nav, a docstring griffe cannot parse or an unresolved cross-reference fails it.
  Skipped only where mkdocs is not installed (``pip install -e '.[docs]'``; ``scripts/setup.sh``
  installs it with the ``dev`` extra).
- Every name in ``revnet.__all__`` (and ``revnet.compile``, ``revnet.models.__all__``,
  ``revnet.memory.__all__``) has a ``::: identifier`` block in some ``docs/api/*.md`` page, so a new
  public name cannot go undocumented.
- Every ````` ```python ````` block of ``docs/index.md``, ``docs/guide/*.md`` and ``docs/api/*.md``
  runs, the blocks of a page in order in one namespace (a fresh process for all pages, one torch
  thread). A block that should be shown but not run (a long training run, a cold inductor
  compile) is fenced as ````` ```py ````` instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import revnet

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
EXAMPLE_PAGES = [DOCS / "index.md", *sorted((DOCS / "guide").glob("*.md")), *API_PAGES]
DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.M)
# Rendered by mkdocstrings as an element with this id, on the API page that documents it.
RENDERED = {
    "engine": ["revnet.ReversibleSequence", "revnet.Coupling", "revnet.AdditiveCoupling",
               "revnet.AffineCoupling", "revnet.Recomputed", "revnet.compile", "revnet.set_reversible",
               "revnet.set_exact", "revnet.has_reversible_units", "revnet.engine.modes.set_stored",
               "revnet.engine.modes.get_modes", "revnet.engine.modes.set_modes",
               "revnet.engine.modes.kept_state", "revnet.engine.modes.units"],
    "memory": ["revnet.plan", "revnet.Plan", "revnet.Plan.apply"],
    "fidelity": ["revnet.fidelity.DriftGuard", "revnet.fidelity.gradient_angle", "revnet.fidelity.roundtrip",
                 "revnet.fidelity.reconstruction_error"],
    "models": ["revnet.create_model", "revnet.list_models", "revnet.register_model", "revnet.RevNet",
               "revnet.ResNet", "revnet.models.RevViT", "revnet.models.VisionTransformer",
               "revnet.models.RevTransformer", "revnet.models.Transformer"],
    "training": ["revnet.training.TrainConfig", "revnet.training.fit", "revnet.training.evaluate_checkpoint"],
}


def _resolve(identifier: str) -> object:
    """The object a ``::: identifier`` block documents: the longest importable module prefix,
    then attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(identifier)


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]' (scripts/setup.sh installs it)")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page, identifiers in RENDERED.items():
        html = (site / "api" / page / "index.html").read_text()
        missing = [i for i in identifiers if f'id="{i}"' not in html]
        assert not missing, f"api/{page}.md: not rendered: {missing}"
    engine = (site / "api" / "engine" / "index.html").read_text()
    assert "Rebuilds the sequence" in engine  # a docstring's text, not only a heading
    assert ":class:`" not in engine and ":func:`" not in engine  # roles read as code (docs/hooks)
    for guide in ("engine", "coupling", "planner", "compile"):
        assert (site / "guide" / guide / "index.html").is_file()


def test_every_public_name_is_documented():
    documented = {id(_resolve(i)) for page in API_PAGES for i in DIRECTIVE.findall(page.read_text())}
    public = {f"revnet.{n}": getattr(revnet, n) for n in revnet.__all__ if not n.startswith("__")}
    public["revnet.compile"] = revnet.compile
    for package in ("models", "memory"):
        module = importlib.import_module(f"revnet.{package}")
        public.update({f"revnet.{package}.{n}": getattr(module, n) for n in module.__all__})
    missing = sorted(name for name, obj in public.items() if id(obj) not in documented)
    assert not missing, (f"public names without a '::: identifier' block in docs/api/*.md: {missing}; add "
                         f"each to the page of its topic (mkdocs.yml's nav lists them), with an example")


_RUNNER = r"""
import json, re, sys, traceback
import torch
torch.set_num_threads(1)
failures = {}
for path in sys.argv[1:]:
    text = open(path).read()
    namespace = {"__name__": "__docs__"}
    torch.manual_seed(0)
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start(1))
        try:
            exec(compile("\n" * line + match.group(1), path, "exec"), namespace)
        except BaseException:
            failures[path] = traceback.format_exc()
            break
print("\n@@" + json.dumps(failures))
"""


def test_examples_run(tmp_path):
    pages = [p for p in EXAMPLE_PAGES if "```python" in p.read_text()]
    assert len(pages) >= 8, "the guides and API pages have lost their examples"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *map(str, pages)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "\n@@" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    failures = json.loads(proc.stdout.rsplit("\n@@", 1)[1])
    assert not failures, "examples that fail (file and line are the markdown's):\n" + "\n".join(
        f"--- {path}\n{tb}" for path, tb in failures.items())
