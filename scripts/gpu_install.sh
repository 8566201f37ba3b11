# Sourced by scripts/gpu_check.sh and scripts/gpu_ncu.sh: build apt_kernels._C from csrc/ (no network, the
# image's own torch). install_extension LOG: pip's editable install, else an in-place build (e.g.
# setuptools < 70.1 without the wheel package: "invalid command 'bdist_wheel'"), which also puts the
# checkout on PYTHONPATH. Returns 1 when both fail (the Triton kernels do not need the extension).
install_extension() {
    local log="$1"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"  # parallel nvcc jobs
    if ! python3 -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
        tail -n 5 "$log"
        echo "   pip install failed; building in place with setup.py build_ext --inplace instead"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        if ! python3 setup.py build_ext --inplace >>"$log" 2>&1; then
            tail -n 40 "$log"
            return 1
        fi
    fi
    grep -E "apt-kernels setup:|Successfully" "$log" || tail -n 5 "$log"
}
