#!/usr/bin/env bash
# Make SITE a folder for PYTHONPATH in front of PY's own packages: the carried wheels
# (.gpu/wheels, from prepare.sh) and this working tree as the `nucleiflow` package. run.sh
# does this on the device (PY = the image's Python 3.12 with CUDA torch); prepare.sh --check
# does the same here with a Python 3.12 that has no torch.
#
#   bash benchmarks/gpu/install.sh PY SITE
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$1 SITE=$2
"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
  --target "$SITE" .gpu/wheels/*.whl
# `nucleiflow` is an implicit namespace package whose subpackages are the repo's folders
# (pyproject's package-dir): links to them, and the metadata run.json's versions read. No
# build, no network, and the code is this tree's as it is now.
mkdir -p "$SITE/nucleiflow"
for d in pipeline models flows; do ln -sfn "$PWD/$d" "$SITE/nucleiflow/$d"; done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
mkdir -p "$SITE/nucleiflow-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: nucleiflow\nVersion: %s\n' "$version" >"$SITE/nucleiflow-$version.dist-info/METADATA"
