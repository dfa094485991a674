# Sourced by scripts/run and scripts/test: makes .venv once and re-installs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-}"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed as python3 (Debian 12: apt-get install -y python3 python3-venv)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || { echo "error: cannot make a virtualenv: apt-get install -y python3-venv" >&2; exit 1; }
fi
stamp=".venv/.installed${extras:+-$extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if [[ ",$extras," == *",model,"* ]] && ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null \
            && ! command -v c++ >/dev/null; then
        echo "error: llama-cpp-python is compiled at install and needs a C++ compiler: apt-get install -y g++" >&2
        exit 1
    fi
    # llama.cpp's build: portable CPU code unless told otherwise (MainPC's GPU: CMAKE_ARGS="-DGGML_CUDA=on")
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
    echo "$want" > "$stamp"
fi
