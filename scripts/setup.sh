#!/usr/bin/env bash
# Set up a development environment from a fresh clone: .venv with the pinned PyTorch and
# softserve installed editable with its dev tools, plus Debian's Fashion-MNIST package
# (the demo's real data) and Chromium (the browser test) when this machine can install them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FASHION_MNIST=/usr/share/datasets/fashion-mnist

if [ ! -e "$FASHION_MNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or pass --data DIR to 'softserve demo prepare'" >&2
  fi
fi

# Chromium, which the browser test of /ui drives through Playwright (no browser download)
if ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium (browser test of /ui)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium not found; the browser test of /ui is skipped until" \
         "'sudo apt-get install chromium'" >&2
  fi
fi

# docker-compose.yml is validated by Debian's docker-compose (`config` needs no engine)
if ! command -v docker-compose >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's docker-compose"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      docker-compose >/dev/null
  else
    echo "setup: docker-compose not found; the compose file checks are skipped" \
         "('sudo apt-get install docker-compose')" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Exactly these pins: they install from this workplace's disk; an unpinned torch pulls GBs.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: ready (.venv/bin/softserve --help)"
