#!/bin/sh
# Install the function's code into OUT (default: deploy/lambda/build/package):
# the proto, gateway and core packages with their runtime dependencies, as
# manylinux2014 x86_64 CPython 3.11 wheels (the python3.11 runtime is Amazon
# Linux 2, glibc 2.26). `sam build` runs it through the Makefile with OUT set
# to its artifacts directory. No Docker needed: the compiled dependencies ship
# manylinux wheels, and pure-Python ones published only as sources are built
# into wheels first. PYTHON (default: the repository's .venv) runs pip.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
out=${1:-"$here/build/package"}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$python" -m pip wheel --quiet --wheel-dir "$wheels" "$root"
"$python" -m pip install --quiet --upgrade --target "$out" --find-links "$wheels" \
    --platform manylinux2014_x86_64 --implementation cp --python-version 3.11 \
    --only-binary=:all: tornado-gateway
echo "installed into $out ($(du -sh "$out" | cut -f1))"
