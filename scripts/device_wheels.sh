#!/usr/bin/env bash
# Stage, in this checkout, what a GPU host without package registries needs to run
# scripts/device_check.sh: softserve's wheel and wheels of the dependencies its image lacks
# (pinned to this .venv's versions, for its Python 3.12) in .whl/, and Fashion-MNIST's
# files in .data/. Both are ignored by git (.git/info/exclude) and travel as `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.data/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
names="tenacity pydantic pydantic_core annotated-types annotated-doc typing-inspection
typing_extensions pydantic-settings python-dotenv fastapi starlette uvicorn httptools h11 anyio
typer click rich shellingham markdown-it-py mdurl Pygments"
pins=()
for name in $names; do
  pins+=("$(.venv/bin/pip list --format=freeze 2>/dev/null | grep -i "^${name//[-_]/[-_]}==")")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
.venv/bin/pip wheel -q --no-deps -w .whl .
mkdir -p .data && cp /usr/share/datasets/fashion-mnist/*.gz .data/
du -sh .whl .data
