#!/usr/bin/env bash
# The CUDA emulator's self-test of its wgmma, dynamic shared memory, sm_90a, mbarrier and TMA
# models (tools/cuda-emu/README.md): builds the emulator, then two host programs that compile
# wgmma_selftest.cu and tma_selftest.cu through the emulated NVRTC and run them through the
# emulated driver. Fails (exit 1) on any mismatch with the host's reference computations or any
# rule not enforced.
set -euo pipefail
cd "$(dirname "$0")/../../.."
CXX=${RLHF_CUDA_EMU_CXX:-g++}
LIB=$(bash tools/cuda-emu/build)
OUT=target/cuda-emu/selftest
mkdir -p "$OUT"
for t in main:wgmma-selftest tma_main:tma-selftest; do
    "$CXX" -std=c++17 -O1 -Wall -Wextra "tools/cuda-emu/selftest/${t%%:*}.cpp" -o "$OUT/${t##*:}" \
        -L"$LIB" -l:libcuda.so.1 -l:libnvrtc.so.13 -Wl,-rpath,"$LIB" &
done
wait
# A cache of its own, so a run always compiles the kernels with the current emu.h.
export RLHF_CUDA_EMU_CACHE="$OUT/modules"
status=0
"$OUT/wgmma-selftest" tools/cuda-emu/selftest || status=1
"$OUT/tma-selftest" tools/cuda-emu/selftest || status=1
exit $status
