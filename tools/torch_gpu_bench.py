#!/usr/bin/env python3
"""Reference GPU timings from PyTorch, run by gpu-bundle/run.sh (tools/gpu-check) on the same
card in the same call as the engine's own benchmarks (crates/tensor/tests/gpu_bench.rs and
`rlhf bench gemm|attention --device cuda`).

- bf16 GEMM C = A·B at n = 4096 and 8192 through torch.matmul (cuBLAS): the reference for the
  engine's gemm_bf16 kernel (issue 4 asks for at least 70% of it), timed twice: isolated calls
  (as gpu_bench.rs times the engine) and back to back as `rlhf bench gemm` times itself
  (gemm_bf16_nn_sustained).
- causal scaled_dot_product_attention, forward, backward and forward+backward, bf16, B = 8,
  H = 12, T = 1024, D = 64: the reference for the engine's flash-attention kernels
  (bench_flash_attention_bf16 in gpu_bench.rs, same bench names and FLOP counts).
- the memory-bound ops around a GPT-2 MLP (bias add, GELU forward and backward, residual add)
  in GB/s: the reference for the engine's elementwise kernels (bench_elementwise_bf16).

Each figure is the median over repeats timed with CUDA events after warm-up, with several
random input sets rotated so the L2 cache does not serve repeats (METHOD.md). Prints one
`BENCH {json}` line per figure.
"""
import json
import time

import torch


def median_ms(fn, sets, warm=3, reps=20):
    for i in range(warm):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def sustained_ms(fn, sets, runs=5, min_run=0.05, warm_up=0.2):
    """`rlhf bench`'s own timing (median_seconds_per_rep in src/cmd/bench.rs), for a reference
    measured like the CLI: back-to-back calls, the repetition count doubled until one run lasts
    min_run seconds and warm_up seconds have passed, then the median over `runs` runs of the
    host time per call (synchronised at the end of each run). A card that slows down under
    sustained load (power, heat) shows it here and not in median_ms's isolated calls."""
    i = 0

    def run(reps):
        nonlocal i
        t = time.perf_counter()
        for _ in range(reps):
            fn(*sets[i % len(sets)])
            i += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t

    reps, start = 1, time.perf_counter()
    while True:
        took = run(reps)
        if took >= min_run and time.perf_counter() - start >= warm_up:
            break
        if took < min_run:
            reps *= 2
    return sorted(run(reps) / reps for _ in range(runs))[runs // 2] * 1e3


def emit(**kw):
    kw["card"] = torch.cuda.get_device_name(0)
    kw["engine"] = "torch " + torch.__version__
    print("BENCH " + json.dumps(kw), flush=True)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    for n in (4096, 8192):
        sets = [
            (torch.randn(n, n, device=dev, dtype=torch.bfloat16),
             torch.randn(n, n, device=dev, dtype=torch.bfloat16))
            for _ in range(3)
        ]
        ms = median_ms(torch.matmul, sets, reps=20 if n == 4096 else 7)
        emit(bench="gemm_bf16_nn", n=n, ms=round(ms, 4), tflops=round(2 * n**3 / (ms * 1e-3) / 1e12, 2))
        # The reference for `rlhf bench gemm --device cuda`, timed as the CLI times itself.
        ms = sustained_ms(torch.matmul, sets)
        emit(bench="gemm_bf16_nn_sustained", n=n, ms=round(ms, 4), tflops=round(2 * n**3 / (ms * 1e-3) / 1e12, 2))
        del sets
    # Causal attention at the engine's benchmark shape (crates/tensor/tests/gpu_bench.rs
    # bench_flash_attention_bf16): B = 8, H = 12, T = 1024, D = 64, bf16, [B, H, T, D].
    # FLOPs as FlashAttention-2 counts them: forward 4·B·H·T²·D / 2 (causal half), backward
    # 2.5 times that; the engine's bench uses the same counts.
    b, h, t, d = 8, 12, 1024, 64
    sets = [
        tuple(torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        for _ in range(3)
    ]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = lambda q, k, v: sdpa(q, k, v, is_causal=True)
    flops = 4 * b * h * t * t * d / 2
    shape = dict(b=b, h=h, t=t, d=d)
    with torch.no_grad():
        ms = median_ms(fwd, sets)
    emit(bench="attn_causal_fwd", **shape, ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 2))

    grad = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)

    def clear(*xs):
        for x in xs:
            x.grad = None

    # Backward only: one recorded forward per input set, its backward replayed (retain_graph),
    # the gradients cleared first so each run writes them afresh.
    outs = [(fwd(*s),) + s for s in sets]

    def bwd(o, q, k, v):
        clear(q, k, v)
        o.backward(grad, retain_graph=True)

    ms = median_ms(bwd, outs)
    emit(bench="attn_causal_bwd", **shape, ms=round(ms, 4), tflops=round(2.5 * flops / (ms * 1e-3) / 1e12, 2))
    del outs

    def fwd_bwd(q, k, v):
        clear(q, k, v)
        fwd(q, k, v).backward(grad)

    ms = median_ms(fwd_bwd, sets)
    emit(bench="attn_causal_fwd_bwd", **shape, ms=round(ms, 4), tflops=round(3.5 * flops / (ms * 1e-3) / 1e12, 2))

    del sets, grad
    # The memory-bound ops around a GPT-2 small MLP (gpu_bench.rs bench_elementwise_bf16, same
    # names and byte counts): bias add and GELU (tanh) forward and backward on [8192, 3072],
    # the residual add on [8192, 768]; bf16.
    rows, hidden, width = 8192, 3072, 768
    el = rows * hidden * 2

    def gbps(nbytes, ms):
        return round(nbytes / (ms * 1e-3) / 1e9, 1)

    big = [(torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16),) for _ in range(3)]
    bias = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
    gelu = torch.nn.functional.gelu
    shape = f"{rows}x{hidden}"
    with torch.no_grad():
        ms = median_ms(lambda x: x + bias, big)
        emit(bench="ew_bias_add", shape=shape, ms=round(ms, 4), gbps=gbps(2 * el, ms))
        ms = median_ms(lambda x: gelu(x, approximate="tanh"), big)
        emit(bench="ew_gelu", shape=shape, ms=round(ms, 4), gbps=gbps(2 * el, ms))
        g = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
        ms = median_ms(lambda x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"), big)
        emit(bench="ew_gelu_bwd", shape=shape, ms=round(ms, 4), gbps=gbps(3 * el, ms))
        del big, g
        res = [tuple(torch.randn(rows, width, device=dev, dtype=torch.bfloat16) for _ in range(2)) for _ in range(3)]
        ms = median_ms(torch.add, res)
        emit(bench="ew_residual_add", shape=f"{rows}x{width}", ms=round(ms, 4), gbps=gbps(3 * rows * width * 2, ms))


if __name__ == "__main__":
    main()
