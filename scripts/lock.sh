#!/usr/bin/env bash
# Rewrite the lock files in requirements/ from pyproject.toml's ranges:  bash scripts/lock.sh
#   requirements/dev.lock       operator + dev + cpu: what ./run.sh, ./test.sh and CI install
#   requirements/operator.lock  operator: the operator's image (deploy/Dockerfile)
#   requirements/worker.lock    the base install, the worker node alone (deploy/worker.Dockerfile)
# The smaller locks are constrained by dev.lock, so a package has one version everywhere.
# To move one package: bash scripts/lock.sh --upgrade-package NAME  (or --upgrade for all).
# Then run ./test.sh (bootstrap reinstalls when a lock file changes) and commit the locks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
compile="${COCOON_VENV:-$root/.venv}/bin/pip-compile"
[ -x "$compile" ] || { echo "pip-compile is missing: ./test.sh --co -q installs the dev extra" >&2; exit 1; }
common=(--quiet --resolver=backtracking --strip-extras --no-emit-index-url
    --no-emit-find-links --no-emit-trusted-host "$@")
"$compile" "${common[@]}" --extra operator --extra dev --extra cpu \
    -o requirements/dev.lock pyproject.toml
"$compile" "${common[@]}" --extra operator -c requirements/dev.lock \
    -o requirements/operator.lock pyproject.toml
"$compile" "${common[@]}" -c requirements/dev.lock -o requirements/worker.lock pyproject.toml
