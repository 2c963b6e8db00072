#!/usr/bin/env bash
# The CUDA emulator's self-test of its wgmma, dynamic shared memory and sm_90a models
# (tools/cuda-emu/README.md): builds the emulator, then a host program that compiles
# wgmma_selftest.cu through the emulated NVRTC and runs it through the emulated driver.
# Fails (exit 1) on any mismatch with a plain triple loop or any rule not enforced.
set -euo pipefail
cd "$(dirname "$0")/../../.."
CXX=${RLHF_CUDA_EMU_CXX:-g++}
LIB=$(bash tools/cuda-emu/build)
OUT=target/cuda-emu/selftest
mkdir -p "$OUT"
"$CXX" -std=c++17 -O1 -Wall -Wextra tools/cuda-emu/selftest/main.cpp -o "$OUT/wgmma-selftest" \
    -L"$LIB" -l:libcuda.so.1 -l:libnvrtc.so.13 -Wl,-rpath,"$LIB"
# A cache of its own, so a run always compiles the kernel with the current emu.h.
export RLHF_CUDA_EMU_CACHE="$OUT/modules"
"$OUT/wgmma-selftest" tools/cuda-emu/selftest
