//! GPU benchmarks of the engine's own CUDA ops, `#[ignore]`d (tools/gpu-check runs them on a
//! GPU machine with `--ignored --nocapture`). Each prints one `BENCH {json}` line; the bundle's
//! run.sh puts them in its summary table beside tools/torch_gpu_bench.py's reference figures
//! (cuBLAS through torch.matmul, torch's scaled_dot_product_attention; on the same card in the
//! same call, under the same bench names).
//!
//! Timing follows the device README's METHOD.md: random inputs (never zeros), warm-up first
//! (module load and JIT stay out), several input sets rotated so repeated runs do not measure
//! the L2 cache, the stream synchronised before each host clock read, median of the repeats.
#![cfg(feature = "cuda")]

use rlhf_tensor::{DType, Device, Tensor};
use std::time::Instant;

fn sync() {
    rlhf_tensor::cuda::device(0)
        .expect("a CUDA device")
        .stream()
        .synchronize()
        .expect("stream synchronize");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `f(i)` over `reps` runs, after `warm` untimed runs; each run timed
/// alone between stream synchronisations.
fn time_ms(warm: usize, reps: usize, mut f: impl FnMut(usize) -> Tensor) -> f64 {
    for i in 0..warm {
        drop(f(i));
    }
    sync();
    let mut ms = Vec::with_capacity(reps);
    for i in 0..reps {
        let t = Instant::now();
        let out = f(i);
        sync();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    median(ms)
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn bench_gemm_bf16() {
    let dev = rlhf_tensor::cuda::device(0).expect("a CUDA device");
    for n in [4096usize, 8192] {
        // Three input pairs: 3 × 2 × n² bf16 (192 MiB at 4096, 768 MiB at 8192) > L2.
        let sets: Vec<(Tensor, Tensor)> = (0..3)
            .map(|s| {
                let a = Tensor::randn(&[n, n], 0.0, 1.0, 10 + s)
                    .to_dtype(DType::BF16)
                    .and_then(|t| t.to_device(Device::Cuda(0)))
                    .expect("upload");
                let b = Tensor::randn(&[n, n], 0.0, 1.0, 20 + s)
                    .to_dtype(DType::BF16)
                    .and_then(|t| t.to_device(Device::Cuda(0)))
                    .expect("upload");
                (a, b)
            })
            .collect();
        let reps = if n == 4096 { 20 } else { 7 };
        let ms = time_ms(3, reps, |i| {
            let (a, b) = &sets[i % sets.len()];
            a.matmul(b).expect("matmul")
        });
        let tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
        println!(
            "BENCH {{\"bench\":\"gemm_bf16_nn\",\"n\":{n},\"ms\":{ms:.4},\"tflops\":{tflops:.2},\"card\":\"{}\",\"engine\":\"rlhf\"}}",
            dev.name()
        );
    }
}

/// Causal flash attention at GPT-2 small's shape with a batch that fills the card: B = 8,
/// H = 12, T = 1024, D = 64, bf16, q, k, v contiguous [B, H, T, D] (the tensor-core forward;
/// the SIMT backward), against torch's scaled_dot_product_attention(is_causal=True) in
/// tools/torch_gpu_bench.py on the same shapes. B = 8 gives 96 heads × 16 query tiles = 1536
/// blocks in the forward, several waves on 132 SMs, and 3 input sets of q, k, v, o at 12 MiB
/// each (151 MiB) do not fit in L2.
///
/// FLOPs are counted the usual way (FlashAttention-2's): the forward's Q·Kᵀ and P·V over the
/// causal half, 4·B·H·T²·D / 2; the backward as 2.5 times that (its five T×T×D products,
/// recomputation not counted; the engine's backward recomputes P in both the dK/dV and the
/// dQ kernel, so it does 7 such products). The same counts as the torch script, so TFLOP/s
/// compare like for like.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn bench_flash_attention_bf16() {
    use rlhf_tensor::Parameter;
    let dev = rlhf_tensor::cuda::device(0).expect("a CUDA device");
    let (b, h, t, d) = (8usize, 12usize, 1024usize, 64usize);
    let upload = |seed: u64| {
        Tensor::randn(&[b, h, t, d], 0.0, 1.0, seed)
            .to_dtype(DType::BF16)
            .and_then(|x| x.to_device(Device::Cuda(0)))
            .expect("upload")
    };
    let sets: Vec<[Parameter; 3]> = (0..3u64)
        .map(|s| [0, 1, 2].map(|i| Parameter::new(upload(100 + 10 * s + i))))
        .collect();
    let grad = upload(200);
    let fwd_flops = 4.0 * (b * h * t * t * d) as f64 / 2.0;
    let emit = |bench: &str, ms: f64, flops: f64| {
        let tflops = flops / (ms * 1e-3) / 1e12;
        println!(
            "BENCH {{\"bench\":\"{bench}\",\"b\":{b},\"h\":{h},\"t\":{t},\"d\":{d},\"ms\":{ms:.4},\"tflops\":{tflops:.2},\"card\":\"{}\",\"engine\":\"rlhf\"}}",
            dev.name()
        );
    };
    let attend = |ps: &[Parameter; 3]| {
        Tensor::causal_attention(&ps[0].tensor(), &ps[1].tensor(), &ps[2].tensor())
            .expect("causal_attention")
    };
    let zero_grads = |ps: &[Parameter; 3]| ps.iter().for_each(|p| p.zero_grad());

    // Forward only (no graph: inference, as in a KV-cache prefill).
    let ms = rlhf_tensor::no_grad(|| time_ms(3, 20, |i| attend(&sets[i % sets.len()])));
    emit("attn_causal_fwd", ms, fwd_flops);

    // Backward only: one recorded forward per input set, its backward replayed (the gradients
    // cleared first, so each run writes them afresh instead of adding).
    let outs: Vec<Tensor> = sets.iter().map(attend).collect();
    let ms = time_ms(3, 20, |i| {
        let ps = &sets[i % sets.len()];
        zero_grads(ps);
        outs[i % outs.len()]
            .backward_with(grad.clone())
            .expect("backward");
        ps[0].grad().expect("dq")
    });
    emit("attn_causal_bwd", ms, 2.5 * fwd_flops);
    drop(outs);

    // Forward and backward, as one training step sees them.
    let ms = time_ms(3, 20, |i| {
        let ps = &sets[i % sets.len()];
        zero_grads(ps);
        let o = attend(ps);
        o.backward_with(grad.clone()).expect("backward");
        o
    });
    emit("attn_causal_fwd_bwd", ms, 3.5 * fwd_flops);
}

/// The memory-bound ops around a GPT-2 small MLP at B·T = 8192 rows, bf16: the bias add after
/// c_fc ([8192, 3072] + [3072]: the broadcast path), GELU and its backward on [8192, 3072], and
/// the residual add ([8192, 768] + [8192, 768]: the flat vector path), against the same ops in
/// torch (tools/torch_gpu_bench.py, same bench names). GB/s counts each tensor read or written
/// once (bias: not counted). Three input sets (at least 150 MiB) rotate past the L2.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn bench_elementwise_bf16() {
    use rlhf_tensor::Parameter;
    let dev = rlhf_tensor::cuda::device(0).expect("a CUDA device");
    let (rows, hidden, width) = (8192usize, 3072usize, 768usize);
    let upload = |shape: &[usize], seed: u64| {
        Tensor::randn(shape, 0.0, 1.0, seed)
            .to_dtype(DType::BF16)
            .and_then(|x| x.to_device(Device::Cuda(0)))
            .expect("upload")
    };
    let emit = |bench: &str, shape: &str, ms: f64, bytes: f64| {
        let gbps = bytes / (ms * 1e-3) / 1e9;
        println!(
            "BENCH {{\"bench\":\"{bench}\",\"shape\":\"{shape}\",\"ms\":{ms:.4},\"gbps\":{gbps:.1},\"card\":\"{}\",\"engine\":\"rlhf\"}}",
            dev.name()
        );
    };
    let big: Vec<Tensor> = (0..3).map(|s| upload(&[rows, hidden], 300 + s)).collect();
    let bias = upload(&[hidden], 310);
    let el = (rows * hidden * 2) as f64;
    let shape = format!("{rows}x{hidden}");
    let ms = rlhf_tensor::no_grad(|| time_ms(3, 20, |i| big[i % 3].add(&bias).expect("add")));
    emit("ew_bias_add", &shape, ms, 2.0 * el);
    let ms = rlhf_tensor::no_grad(|| time_ms(3, 20, |i| big[i % 3].gelu().expect("gelu")));
    emit("ew_gelu", &shape, ms, 2.0 * el);

    // GELU's backward alone: one recorded forward per input set, its backward replayed.
    let params: Vec<Parameter> = big.iter().map(|x| Parameter::new(x.clone())).collect();
    let outs: Vec<Tensor> = params
        .iter()
        .map(|p| p.tensor().gelu().expect("gelu"))
        .collect();
    let grad = upload(&[rows, hidden], 320);
    let ms = time_ms(3, 20, |i| {
        params[i % 3].zero_grad();
        outs[i % 3].backward_with(grad.clone()).expect("backward");
        params[i % 3].grad().expect("dx")
    });
    emit("ew_gelu_bwd", &shape, ms, 3.0 * el);
    drop((outs, params, big));

    let res: Vec<(Tensor, Tensor)> = (0..3)
        .map(|s| {
            (
                upload(&[rows, width], 330 + s),
                upload(&[rows, width], 340 + s),
            )
        })
        .collect();
    let ms = rlhf_tensor::no_grad(|| {
        time_ms(3, 20, |i| {
            let (a, b) = &res[i % 3];
            a.add(b).expect("add")
        })
    });
    emit(
        "ew_residual_add",
        &format!("{rows}x{width}"),
        ms,
        3.0 * (rows * width * 2) as f64,
    );
}
