#!/usr/bin/env python3
"""Times one GPT-2 training step in PyTorch eager mode on the CPU: the baseline for
`rlhf bench train-step`.

Builds the `small-cpu` preset with transformers' GPT2LMHeadModel (vocab 257 = 256 bytes +
end-of-text, context 256, d_model 256, 4 layers, 4 heads, MLP width 4·d, tanh GELU, tied LM head,
dropout 0), then times forward + cross-entropy loss + backward + AdamW step on random tokens:
`--warmup` untimed steps, then the median of `--runs` timed steps. Each step is
`zero_grad(set_to_none=True)`, `logits = model(x)`, mean cross-entropy of `logits` against the next
tokens (B·T predictions: the batch holds T+1 tokens per row), `loss.backward()`, `opt.step()`.
AdamW: lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices (dim >= 2, so the tied
embedding too) and 0 on biases and LayerNorms, PyTorch's default (for-loop) CPU implementation.
No gradient clipping unless `--clip-norm` is given. No torch.compile: this is the eager baseline.

Prints exactly one JSON line on stdout:

    {"op":"train_step","impl":"pytorch","preset":"small-cpu","batch":8,"seq":256,"threads":2,
     "tokens_per_s":...,"ms_per_step":...,"params":...}

tokens_per_s = batch·seq / median step time; params counts each parameter tensor once (the tied
LM head is wte). Details (versions, attention kernel, per-run times, loss) go to stderr.

    tools/setup-python-venv torch
    .tools/venv/bin/python tools/torch_train_step.py --batch 8 --seq 256 --threads 2
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
    "small-cpu": dict(vocab_size=257, n_positions=256, n_embd=256, n_layer=4, n_head=4),
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
    args = ap.parse_args()

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
        bos_token_id=256,
        eos_token_id=256,
    )
    model = GPT2LMHeadModel(config)
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
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
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
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    tokens_per_step = args.batch * args.seq
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
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
            },
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
