"""The scripts in examples/ run as a user copies them, and say what they claim."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=EXAMPLES.parent.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_reversible_blocks_trains_and_matches_plain_autograd():
    out = run("reversible_blocks.py", "--blocks", "3", "--steps", "3", "--batch", "8")
    assert "step   2  loss" in out
    diff = float(re.search(r"relative difference ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-10  # float64: reversible backprop gives plain autograd's gradients


def test_measure_memory_shows_reversible_flat_and_plain_growing():
    out = run("measure_memory.py", "--blocks", "2", "8", "--batch", "16")
    rows = [line.split() for line in out.splitlines()[1:]]
    saved = {int(r[0]): (float(r[5]), float(r[8])) for r in rows}  # (reversible, plain) MiB
    assert saved[8][0] == saved[2][0]  # the reversible step keeps the same tensors at any depth
    assert saved[8][1] > 3 * saved[2][1]  # plain autograd keeps every block's activations


def test_finetune_hf_converts_trains_generates_and_round_trips(tmp_path):
    out = run("finetune_hf.py", "--steps", "4", "--layers", "2", "--width", "32", "--context", "32",
              "--batch", "4", "--out", str(tmp_path / "model"))
    saved = re.search(r"([0-9.]+) MiB before conversion, ([0-9.]+) MiB after", out)
    assert float(saved.group(1)) > 3 * float(saved.group(2))
    assert "step    3  loss" in out and "sample: #include <" in out
    assert "same outputs: True" in out and (tmp_path / "model" / "config.json").exists()
