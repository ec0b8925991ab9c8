#!/usr/bin/env bash
# Creates (once) the virtual environment .venv and installs dpjax into it with the exact pins of
# constraints.txt. Sourced by launch/test.sh and launch/run.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DPJAX_VENV:-$root/.venv}"
stamp="$venv/.dpjax-installed"
want="$(cat "$root/constraints.txt" "$root/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]"
  echo "$want" > "$stamp"
fi
