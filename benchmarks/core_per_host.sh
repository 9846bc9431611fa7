#!/usr/bin/env bash
# Carry the cluster benchmarks to a machine with a core per host and run them there (docs/cluster.md, "On a machine
# with a core per host").
#
#   bash benchmarks/core_per_host.sh prepare   # here, in the repo root, README's venv active: writes .devcarry/
#   . benchmarks/core_per_host.sh env          # there, in the repo root: then run the benchmarks from /tmp
#
# For a machine with torch, lightning and torchmetrics but no hydra/omegaconf/torch-fidelity, no iproute2 and no
# network. `prepare` packs what is missing: the project as a wheel, the pure-Python packages copied from this
# venv, and `ip`/`tc` with their libraries behind wrappers that pass the libraries to the loader alone (through
# LD_LIBRARY_PATH they would reach every worker that `ip netns exec` starts). Copy `.devcarry` with the repository.

case "${1:-}" in
prepare)
    set -euo pipefail
    carry=.devcarry
    grep -qxF "/$carry/" .git/info/exclude 2>/dev/null || echo "/$carry/" >>.git/info/exclude
    rm -rf "$carry" && mkdir -p "$carry/site" "$carry/bin" "$carry/iproute/lib" "$carry/wheel"
    site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    for package in hydra omegaconf antlr4 torch_fidelity; do
        cp -r "$site/$package" "$carry/site/"
    done
    find "$carry/site" -name __pycache__ -prune -exec rm -rf {} +
    # built from a copy of the working tree's files: an old build/ could slip deleted modules into the wheel
    tree=$(mktemp -d)
    git ls-files -co --exclude-standard | while read -r f; do [ -e "$f" ] && echo "$f"; done | tar -cf - -T - | tar -xf - -C "$tree"
    pip wheel -q --no-deps --no-build-isolation -w "$carry/wheel" "$tree"
    rm -rf "$tree"
    for tool in ip tc; do
        binary=$(command -v "$tool")
        cp -L "$binary" "$carry/iproute/$tool.bin"
        # every library but glibc's and zlib, which the other machine has
        ldd "$binary" | awk '$3 ~ /^\// {print $3}' | grep -vE '/lib(c|m|z|pthread|dl)\.so' |
            xargs -r -I{} cp -L {} "$carry/iproute/lib/"
        cat >"$carry/bin/$tool" <<'EOF'
#!/bin/sh
d=$(dirname "$(readlink -f "$0")")/../iproute
exec /lib64/ld-linux-x86-64.so.2 --library-path "$d/lib" "$d/$(basename "$0").bin" "$@"
EOF
        chmod +x "$carry/bin/$tool"
    done
    du -sh "$carry"
    ;;
env)
    REPO=$(pwd)
    export REPO
    if [ ! -d /tmp/site/lightning_dpgan ]; then
        mkdir -p /tmp/site
        python3 -m zipfile -e "$REPO"/.devcarry/wheel/*.whl /tmp/site
        cp -r "$REPO"/.devcarry/site/* /tmp/site/
    fi
    # no GPU (the benchmarks are CPU hosts), one thread per process; note that `nproc` honours OMP_NUM_THREADS
    export PYTHONPATH=/tmp/site OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1
    if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
        export PATH="$REPO/.devcarry/bin:$PATH"
    fi
    # from the repo root `python -m lightning_dpgan` would find the source tree, whose configs live outside it
    cd /tmp
    ;;
*)
    echo "usage: bash benchmarks/core_per_host.sh prepare | . benchmarks/core_per_host.sh env" >&2
    ;;
esac
