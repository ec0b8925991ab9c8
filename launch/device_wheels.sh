#!/usr/bin/env bash
# Fills the git-ignored folders that a device call carries (WORKSPACE.md, "Running on a GPU"):
#   .whl/        the packages dpjax needs that the GPU image (Python 3.12, jax, flax, optax,
#                orbax, chex, torch, timm) lacks, at the pins of constraints.txt;
#   .whl_peers/  with PEERS=1: opacus and jax_privacy for benchmarks/peers/run_peers.sh;
#   .data/       with DATA=1: ../shared/data/cifar10-jpeg (19 MB; MNIST and Fashion-MNIST: add
#                them by hand, the three with the wheels pass the 64-MiB carry limit).
# Run it here, once per fresh checkout:  PEERS=1 DATA=1 bash launch/device_wheels.sh
# Then carry [".whl", ".data"] (and ".whl_peers") and start the command with
# `source launch/device_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
# grain's own requirements (cloudpickle, portpicker, psutil) are listed: the image lacks them and
# `import grain` fails without them. promise has no wheel on PyPI: built here.
WANTED="absl-py array_record attrs cloudpickle dm-tree docstring_parser dp-accounting etils
  googleapis-common-protos grain immutabledict importlib_resources ml_collections mpmath
  portpicker psutil PyYAML simple-parsing tensorboardX tensorflow-datasets tensorflow-metadata
  termcolor toml wrapt zipp"
# jax_privacy needs pydantic (pinned with the core it requires) and its typing-extensions floor.
PEER_PINS="opacus==1.6.0 jax-privacy==2.0.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 opt-einsum==3.4.0"

pin() {  # pin NAME: NAME==VERSION from constraints.txt (names compared as pip does)
  local norm
  norm=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v n="$norm" '{k=tolower($1); gsub(/[_.]/, "-", k)} k == n {print; exit}' \
    constraints.txt | grep . || { echo "no pin for $1 in constraints.txt" >&2; return 1; }
}
download() {  # download DIR SPEC...: CPython 3.12 x86_64 wheels, no dependencies
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}

pins=()
for name in $WANTED; do pins+=("$(pin "$name")"); done
download .whl "${pins[@]}"
python3 -m pip wheel -q --no-deps -w .whl "$(pin promise)" 2>&1 \
  | grep -v "^WARNING: Location" || true
if [ "${PEERS:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  download .whl_peers $PEER_PINS
fi
if [ "${DATA:-0}" = 1 ]; then
  mkdir -p .data && cp -r "${DPJAX_DATA_DIR:-../shared/data}/cifar10-jpeg" .data/
fi
expected=$(($(echo $WANTED | wc -w) + 1))
found=$(ls .whl/*.whl | wc -l)
[ "$found" -ge "$expected" ] || { echo "only $found of $expected wheels in .whl" >&2; exit 1; }
du -sh .whl $([ "${PEERS:-0}" = 1 ] && echo .whl_peers) $([ "${DATA:-0}" = 1 ] && echo .data)
