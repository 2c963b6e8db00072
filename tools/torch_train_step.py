#!/usr/bin/env python3
"""Times one GPT-2 training step in PyTorch eager mode, on the CPU or a CUDA GPU: the baseline
for `rlhf bench train-step` (same device, same run).

Builds a preset with transformers' GPT2LMHeadModel: `small-cpu` (vocab 257 = 256 bytes +
end-of-text, context 256, d_model 256, 4 layers, 4 heads) or `gpt2` (GPT-2 124M: vocab 50257,
context 1024, d_model 768, 12 layers, 12 heads); MLP width 4·d, tanh GELU, tied LM head,
dropout 0. Then it times forward + cross-entropy loss + backward + AdamW step on random tokens:
`--warmup` untimed steps, then the median of `--runs` timed steps. Each step is
`zero_grad(set_to_none=True)`, `logits = model(x)`, mean cross-entropy of `logits` against the next
tokens (B·T predictions: the batch holds T+1 tokens per row), `loss.backward()`, `opt.step()`.
AdamW: lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices (dim >= 2, so the tied
embedding too) and 0 on biases and LayerNorms, PyTorch's default implementation for the device
(a for-loop on the CPU, the multi-tensor "foreach" kernels on CUDA; not the fused kernel).
No gradient clipping unless `--clip-norm` is given. No torch.compile: this is the eager baseline.

On CUDA (`--device cuda`), `--precision bf16` (the default there) runs the forward and the loss
under `torch.autocast(dtype=torch.bfloat16)`: f32 parameters and optimiser state, bf16 matrix
products and attention, f32 LayerNorm, softmax and loss (autocast's own lists), the same mixed
precision as `rlhf bench train-step --device cuda`. Each timed step is bracketed by
torch.cuda.synchronize(), so its time covers all of its kernels.

Prints exactly one JSON line on stdout:

    {"op":"train_step","impl":"pytorch","preset":"small-cpu","batch":8,"seq":256,"threads":2,
     "tokens_per_s":...,"ms_per_step":...,"params":...,"device":"cpu","card":"cpu",
     "precision":"f32","loss_first":...,"loss_last":...}

tokens_per_s = batch·seq / median step time; params counts each parameter tensor once (the tied
LM head is wte). Details (versions, attention kernel, per-run times, loss) go to stderr.

    tools/setup-python-venv torch
    .tools/venv/bin/python tools/torch_train_step.py --batch 8 --seq 256 --threads 2
    python3 tools/torch_train_step.py --device cuda --preset gpt2 --batch 8 --seq 1024 --clip-norm 1.0
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

PRESETS = {
    "small-cpu": dict(vocab_size=257, n_positions=256, n_embd=256, n_layer=4, n_head=4,
                      bos_token_id=256, eos_token_id=256),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 bos_token_id=50256, eos_token_id=50256),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small-cpu", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--runs", type=int, default=10, help="timed steps; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="transformers attention: sdpa (its default, PyTorch's fused "
        "scaled_dot_product_attention) or eager (explicit matmul/softmax)",
    )
    ap.add_argument("--clip-norm", type=float, default=0.0, help="clip gradients to this global norm (0: off)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--precision",
        choices=["f32", "bf16"],
        help="f32, or bf16 autocast (CUDA only); default: f32 on the CPU, bf16 on CUDA",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    precision = args.precision or ("bf16" if on_gpu else "f32")
    if precision == "bf16" and not on_gpu:
        sys.exit("--precision bf16 needs --device cuda (the engine's CPU side computes in f32)")
    if on_gpu and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch sees no CUDA device")

    preset = PRESETS[args.preset]
    if args.seq > preset["n_positions"]:
        sys.exit(f"--seq {args.seq} exceeds the preset's context {preset['n_positions']}")
    if min(args.batch, args.seq, args.threads, args.runs) < 1 or args.warmup < 0:
        sys.exit("--batch, --seq, --threads and --runs must be positive, --warmup non-negative")

    # Intra-op threads are what the Rust side's --threads sets; no inter-op parallelism in eager.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)

    config = GPT2Config(
        **preset,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(device)
    model.config._attn_implementation = args.attn
    model.train()
    params = list(model.parameters())  # a tied tensor appears once
    n_params = sum(p.numel() for p in params)

    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=gen)
    inputs = tokens[:, :-1].contiguous().to(device)
    targets = tokens[:, 1:].contiguous().to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
        loss.backward()
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_norm)
        opt.step()
        return loss.item()

    # Timings on a shared machine mean little without knowing how busy it was.
    load_before = os.getloadavg()[0]
    losses = []
    for _ in range(args.warmup):
        losses.append(step())
    times = []
    for _ in range(args.runs):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    tokens_per_step = args.batch * args.seq
    card = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"device {device} ({card}), precision {precision}, "
        f"threads {torch.get_num_threads()}, attention {args.attn}, clip {args.clip_norm or 'off'}; "
        f"step ms (median {median * 1e3:.1f}, min {min(times) * 1e3:.1f}): "
        f"{', '.join(f'{t * 1e3:.1f}' for t in times)}; "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"on {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "op": "train_step",
                "impl": "pytorch",
                "preset": args.preset,
                "batch": args.batch,
                "seq": args.seq,
                "threads": args.threads,
                "tokens_per_s": round(tokens_per_step / median, 1),
                "ms_per_step": round(median * 1e3, 3),
                "params": n_params,
                "device": str(device),
                "card": card,
                "precision": precision,
                "loss_first": round(losses[0], 4),
                "loss_last": round(losses[-1], 4),
            },
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
