#!/usr/bin/env bash
# Run Cocoon's tests: ./test.sh  (any arguments go to pytest)
# Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (database "test"); tests whose
# server is missing are skipped outside CI and fail in CI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/bootstrap.sh" "operator,dev,cpu"
cd "$root"
# Keep compiled bytecode (git-ignored __pycache__) even where the environment says not to:
# without it every test process, and every process a test starts, compiles the project and
# re-rewrites every test module's asserts from source (about 8 s each on 2 cores).
unset PYTHONDONTWRITEBYTECODE
exec "${COCOON_VENV:-$root/.venv}/bin/python" -m pytest "$@"
