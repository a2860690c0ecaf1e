#!/usr/bin/env bash
# Every GPU check of a session that is lent a device machine, as one prepared command (the device's
# 15 minutes cover one or two tries). From the repository root on that machine:
#
#     bash benchmarks/gpu_session.sh            # e.g. the device tool's run, timeout_s 540
#
# 1. the machine: GPU, driver, the Python packages the checks use;
# 2. the CUDA tests on the real GPU (conftest turns the simulator on only without /dev/nvidiactl);
# 3. benchmarks/bench_gpu.py: one float64 step of devices cuda and cpu validated against the NumPy
#    reference, then A and B timed at batch 32-1024 beside PyTorch on CUDA (the table for NOTES and
#    the README).
# Installs nothing (the device image holds numba, numba-cuda, scipy, click, matplotlib, pytest,
# hypothesis and torch); every output also goes under $OUT (brought back by the device tool), else
# ./gpu-out. Each part has its own time limit so that a hang in one still leaves the others' output.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset NUMBA_ENABLE_CUDASIM
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import numba, numpy, scipy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__,
'scipy', scipy.__version__, 'torch', torch.__version__, 'torch sees CUDA:', torch.cuda.is_available())"
} 2>&1 | tee "$out/machine.txt"
set -o pipefail
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_ops_cuda.py tests/test_network_cuda.py \
    tests/test_per_sample_cuda.py 2>&1 | tee "$out/cuda-tests.txt"
tests=$?
timeout 240 python3 benchmarks/bench_gpu.py --out "$out/gpu.json" 2>&1 | tee "$out/bench-gpu.txt"
bench=$?
echo "CUDA tests exit $tests, bench_gpu exit $bench; outputs in $out"
exit $(( tests || bench ))
