#!/usr/bin/env bash
# Creates .venv and installs revnet with its training and dev tools, torch pinned by
# scripts/constraints.txt; with --data, also the Debian package that ships Fashion-MNIST
# (needs root and apt-get). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
want_data=0
[ "${1:-}" = "--data" ] && want_data=1

if [ "$want_data" = 1 ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
    && [ -z "${REVNET_DATA:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or set REVNET_DATA to a folder with the four IDX files." >&2
  fi
fi

# The stamp records what was installed, so a second run takes a second.
stamp=.venv/.revnet-installed
constraints=scripts/constraints.txt
digest=$(cat pyproject.toml scripts/setup.sh "$constraints" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
if [ ! -x .venv/bin/pip ]; then  # (a venv made without ensurepip has python but no pip)
  "$PYTHON" -m venv --clear .venv || {
    echo "setup: '$PYTHON -m venv' failed; on Debian/Ubuntu install python3-venv" \
         "(apt-get install python3-venv), or point PYTHON at another python >= 3.10." >&2
    exit 1
  }
fi
# torch is pinned by the constraints file (the package asks only for a floor) and installed
# first, alone, so that no other requirement makes pip resolve a CUDA build. A local CPU
# wheel (pip's find-links) is used as it is; otherwise, on Linux, PyPI's wheel would pull
# several GB of CUDA libraries, so PyTorch's CPU index is added (TORCH_INDEX overrides it;
# TORCH_INDEX= keeps PyPI's build).
torch_pin=$(grep -E '^torch==' "$constraints")
pip=(.venv/bin/python -m pip --disable-pip-version-check)
if [ -z "${TORCH_INDEX+set}" ] && [ "$(uname -s)" = Linux ] \
    && ! "${pip[@]}" install -q --dry-run --no-deps --no-index "$torch_pin" >/dev/null 2>&1; then
  TORCH_INDEX=https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" install -q "$torch_pin" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"${pip[@]}" install -q -c "$constraints" -e ".[dev]"
.venv/bin/python -c "import torch, revnet; print('setup: torch', torch.__version__, '| revnet', revnet.__version__)"
echo "$digest" > "$stamp"
