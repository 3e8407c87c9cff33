#!/usr/bin/env bash
# Run the whole Cocoon stack with embedded defaults: ./run.sh  (any arguments go to `cocoon up`)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/bootstrap.sh" "operator,cpu"
exec "${COCOON_VENV:-$root/.venv}/bin/cocoon" up "$@"
