#!/usr/bin/env bash
# Creates .venv and installs revnet with its dev tools; with --data, also the Debian
# package that ships Fashion-MNIST (needs root and apt-get). Safe to run again.
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
digest=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch is pinned (pyproject.toml) to the 2.13.0 CPU wheel; installing it first, alone,
# keeps pip from resolving a multi-GB CUDA build for any other requirement.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/python -c "import torch, revnet; print('setup: torch', torch.__version__, '| revnet', revnet.__version__)"
echo "$digest" > "$stamp"
