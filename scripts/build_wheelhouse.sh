#!/usr/bin/env bash
# Build wheelhouse/: the wheels a lent GPU machine lacks to run cl-runner, for scripts/gpu_check.py to install
# there offline (pip install --no-index --find-links wheelhouse ...). Run it here, where PyPI is reachable.
#
# The GPU machines' image (docs/gpus.md) has Python 3.12 with torch, transformers, peft, accelerate, matplotlib,
# rich, pyarrow, pandas, xxhash, fsspec, huggingface-hub, pytest and pytest-xdist, but not:
#   hydra-core, omegaconf, antlr4-python3-runtime  (every run: the config)
#   datasets, dill, multiprocess                    (tasks with source=datasets; the GPU check itself reads only the
#                                                    bundled facts, but a run records datasets' version)
#   fsspec                                          (datasets caps it: a newer one there is replaced by this one)
# All of them are pure Python (multiprocess per Python version), a few MiB in all; antlr4-python3-runtime 4.9.3
# exists only as a source archive, so it is built here into a py3-none-any wheel.
#
# Versions: those installed in this environment (the ones the test suite passes with), so the GPU machine runs what
# was tested here; a package missing here falls back to the pin below.
#
#   bash scripts/build_wheelhouse.sh                 # wheelhouse/ for Python 3.12 (the GPU image's)
#   PY_VERSIONS="3.11 3.12" bash scripts/build_wheelhouse.sh wheelhouse
set -euo pipefail

out=${1:-wheelhouse}
py_versions=${PY_VERSIONS:-3.12}
python=${PYTHON:-python3}
limit_mib=64   # what the device tool carries with the working tree, the repository itself included

declare -A fallback=([hydra-core]=1.3.2 [omegaconf]=2.3.0 [datasets]=4.0.0 [dill]=0.3.8 [multiprocess]=0.70.16
                     [fsspec]=2025.3.0)
pins=()
for name in hydra-core omegaconf datasets dill multiprocess fsspec; do
  version=$("$python" -c "from importlib.metadata import version; print(version('$name'))" 2>/dev/null \
            || echo "${fallback[$name]}")
  pins+=("$name==$version")
done

mkdir -p "$out"
# the only source-only dependency: build its wheel (pure Python) without touching this environment
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "antlr4-python3-runtime==4.9.3"
for py in $py_versions; do
  # --no-deps: the GPU image already holds every other dependency (the list above); pulling them in would add
  # pyarrow (~40 MiB) and numpy for nothing
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --dest "$out" "${pins[@]}"
done

size_kib=$(du -sk "$out" | cut -f1)
ls -1 "$out"
echo "wheelhouse: $(ls "$out" | wc -l) wheels, $((size_kib / 1024)) MiB ($size_kib KiB) in $out"
if (( size_kib > limit_mib * 1024 )); then
  echo "wheelhouse: over $limit_mib MiB: the device tool would not carry it" >&2
  exit 1
fi
