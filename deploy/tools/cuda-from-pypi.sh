#!/usr/bin/env bash
# Build the CUDA verify node on a machine with no GPU, no driver and no system CUDA, using only
# CUDA 13.0 wheels from PyPI (the recipe measured in ../shared/GPU.md):
#
#   deploy/tools/cuda-from-pypi.sh setup DEST     # once: wheels + a CUDA_HOME-shaped tree in DEST
#   deploy/tools/cuda-from-pypi.sh build DEST     # cargo build --release --features cuda
#   deploy/tools/cuda-from-pypi.sh runtime DEST   # on a GPU host: only the runtime libraries,
#                                                 # in DEST/lib (the unit's LD_LIBRARY_PATH)
#
# The binary lands in $CARGO_TARGET_DIR (default target-cuda/)/release/edgespec-verify-node. Its
# kernels are built for ONE GPU generation: CUDA_COMPUTE_CAP (default 90: H100/H200; 80 A100,
# 86 A10/A40, 89 L4/L40S), see docs/DEPLOYMENT.md "GPU generations". It needs, on the GPU
# machine, driver 580+ (CUDA 13.0) and libcublas.so.13, libcurand.so.10, libcudart.so.13 on
# LD_LIBRARY_PATH: `runtime /opt/edgespec/cuda13` installs exactly these (the systemd unit points
# LD_LIBRARY_PATH at /opt/edgespec/cuda13/lib). Pin 13.0.x: PTX from nvcc 13.1+ does not load on
# driver 580. deploy/container/Dockerfile.cuda uses the same CUDA 13.0 (checked by
# deploy/tools/check_deploy.py).
set -euo pipefail

cmd=${1:-}
dest=${2:-}
if [[ -z $cmd || -z $dest ]]; then
    echo "usage: $0 setup|build|runtime DEST" >&2
    exit 2
fi
dest=$(realpath -m "$dest")
root=$dest/root

setup() {
    mkdir -p "$dest"
    if [[ ! -x $dest/wheels/nvidia/cu13/bin/nvcc ]]; then
        # One --no-deps call: nvidia-cuda-nvcc's unpinned dependencies would pull 13.5, and a
        # second `pip install --target` into the same folder skips nvidia/ silently.
        python3 -m pip install --quiet --no-deps --target "$dest/wheels" \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
            nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
    fi
    local w=$dest/wheels/nvidia/cu13
    rm -rf "$root"
    mkdir -p "$root/lib64/stubs"
    ln -s "$w/bin" "$root/bin"
    ln -s "$w/include" "$root/include"
    ln -s "$w/nvvm" "$root/nvvm"
    ln -s lib64 "$root/lib"
    for f in "$w"/lib/*; do ln -s "$f" "$root/lib64/"; done
    # Unversioned names for the linker.
    for l in cublas cublasLt cudart curand nvrtc; do
        local real
        real=$(ls "$w"/lib/lib$l.so.* | sort | head -n1)
        ln -sf "$real" "$root/lib64/lib$l.so"
    done
    # libcuda.so stub (the driver library is not in any wheel): every CUresult-returning
    # function of cuda.h (names after macro expansion, e.g. cuCtxCreate_v2), returning
    # CUDA_ERROR_NO_DEVICE (100). Only for linking; the driver's libcuda.so.1 replaces it.
    # Plus every cu* symbol cudarc's driver bindings name, when cargo has fetched cudarc.
    {
        gcc -E -P -I "$w/include" "$w/include/cuda.h" | tr '\n' ' ' |
            grep -oE 'CUresult +(CUDAAPI +)?cu[A-Za-z0-9_]+ *\(' |
            sed -E 's/.*(cu[A-Za-z0-9_]+) *\(/\1/'
        find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/*.rs' \
            -print0 2>/dev/null | xargs -0 -r grep -ohE '^ +fn cu[A-Za-z0-9_]+\(' |
            sed -E 's/ *fn (cu[A-Za-z0-9_]+)\(/\1/' || true
    } | sort -u |
        awk '{ printf "int %s(void) { return 100; }\n", $1 }' >"$root/lib64/stubs/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib64/stubs/libcuda.so" \
        "$root/lib64/stubs/libcuda.c"
    ln -sf libcuda.so "$root/lib64/stubs/libcuda.so.1"
    cat >"$dest/env.sh" <<EOF
export PATH=$root/bin:\$PATH
export CUDA_HOME=$root CUDA_PATH=$root CUDA_ROOT=$root CUDA_TOOLKIT_ROOT_DIR=$root
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=\$(nproc)
export LIBRARY_PATH=$root/lib64:$root/lib64/stubs
EOF
    echo "CUDA 13.0 toolchain ready: source $dest/env.sh ($(wc -l <"$root/lib64/stubs/libcuda.c") stub symbols)"
}

# The libraries the verify node links (ldd: libcudart.so.13, libcublas.so.13 -> libcublasLt.so.13,
# libcurand.so.10), same versions as the build's. About 0.9 GB, mostly cuBLASLt.
runtime() {
    if [[ ! -d $dest/wheels/nvidia/cu13/lib ]]; then
        python3 -m pip install --quiet --no-deps --target "$dest/wheels" \
            nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
    fi
    ln -sfn wheels/nvidia/cu13/lib "$dest/lib"
    chmod -R a+rX "$dest"
    echo "CUDA 13.0 runtime libraries in $dest/lib (set LD_LIBRARY_PATH=$dest/lib)"
}

build() {
    [[ -f $dest/env.sh ]] || setup
    # shellcheck disable=SC1091
    source "$dest/env.sh"
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
    cargo build --release -j"$(nproc)" -p edgespec-verify-node --features cuda \
        --bin edgespec-verify-node
    echo "built $CARGO_TARGET_DIR/release/edgespec-verify-node"
}

case $cmd in
setup) setup ;;
build) build ;;
runtime) runtime ;;
*)
    echo "unknown command $cmd (setup|build|runtime)" >&2
    exit 2
    ;;
esac
