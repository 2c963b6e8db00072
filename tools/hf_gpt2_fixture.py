#!/usr/bin/env python3
"""Reference GPT-2 fixtures from Hugging Face `transformers`, and the reverse check.

Two modes:

1. Write the fixture (default). Builds a small randomly initialised GPT-2 with transformers
   (GPT2Config, GPT2LMHeadModel in eval mode, seeded), saves it with `save_pretrained` (safetensors)
   into tests/fixtures/hf_gpt2/, and writes `expected.safetensors` with a [2, 12] batch of input ids
   (`input_ids`, I64), the logits transformers computes for them (`logits`, F32 [2, 12, vocab]) and
   the mean next-token cross-entropy with labels = input ids (`loss`, F32 [1], as transformers
   computes it: positions 0..10 predict tokens 1..11). The Rust parity test reads these files, so it
   runs with no Python.

       tools/setup-python-venv torch
       .tools/venv/bin/python tools/hf_gpt2_fixture.py            # writes tests/fixtures/hf_gpt2/
       .tools/venv/bin/python tools/hf_gpt2_fixture.py --out DIR  # somewhere else

   The weights come from torch's CPU generator, so the same seed and the same torch/transformers
   versions (recorded in tests/fixtures/hf_gpt2/README.md) reproduce the files bit for bit; other
   versions may draw different weights, which is fine as long as all files are regenerated together.

   transformers' own initialisation sets every bias to 0 and every LayerNorm to (1, 0), which would
   let a loader that drops or transposes those tensors pass. So after initialisation every
   parameter is perturbed with seeded noise: each tensor then holds distinct values, and a
   misplaced or transposed tensor changes the logits.

2. Check a checkpoint our Rust code wrote (the Rust -> transformers direction):

       .tools/venv/bin/python tools/hf_gpt2_fixture.py --check DIR --ids '[[1,2,3],[4,5,6]]'
       .tools/venv/bin/python tools/hf_gpt2_fixture.py --check DIR --compare LOGITS.safetensors

   DIR holds model.safetensors and config.json. The model is loaded with
   GPT2LMHeadModel.from_pretrained (offline). Missing, unexpected or mis-shaped parameters are
   errors (only a missing lm_head.weight is allowed: it is tied to transformer.wte.weight). The
   script prints one JSON object: the loading report, the input ids, the logits transformers
   computes, and with --compare (a safetensors file with `input_ids` I64 and `logits` F32, e.g.
   written by the Rust side) the largest absolute difference; it exits 1 if that exceeds --tol.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# Never reach for the Hub: everything here is local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "hf_gpt2"

SEED = 1234
BATCH, SEQ = 2, 12
CONFIG = dict(
    vocab_size=64,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_inner=None,  # 4 * n_embd
    activation_function="gelu_new",  # GELU, tanh approximation
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    layer_norm_epsilon=1e-5,
    # A wider initialisation than GPT-2's 0.02 so that the logits spread over several units and a
    # wrong weight shows up far above float rounding.
    initializer_range=0.2,
    tie_word_embeddings=True,
    bos_token_id=63,
    eos_token_id=63,
)


def perturb_(model: GPT2LMHeadModel, gen: torch.Generator) -> None:
    """Adds seeded noise to every parameter (see the module doc for why)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                # LayerNorm gains around 1, not 0.
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.add_(0.05 * noise)


def write_fixture(out: Path) -> None:
    torch.manual_seed(SEED)
    config = GPT2Config(**CONFIG)
    model = GPT2LMHeadModel(config)
    # The plain softmax(QK^T/sqrt(d))V path: the reference maths, not a fused kernel.
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(SEED + 1)
    perturb_(model, gen)
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), (
        "lm_head must be tied to wte"
    )

    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        result = model(input_ids=ids, labels=ids)
    logits = result.logits.float().contiguous()
    loss = result.loss.float().reshape(1)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # save_pretrained may leave a generation_config.json; the Rust side has no use for it.
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    save_file(
        {"input_ids": ids.numpy(), "logits": logits.numpy(), "loss": loss.numpy()},
        str(out / "expected.safetensors"),
        # One key only: safetensors writes metadata in hash order, and a single key keeps the
        # file byte-identical across reruns.
        metadata={
            "producer": f"tools/hf_gpt2_fixture.py seed={SEED} torch={torch.__version__} "
            f"transformers={transformers.__version__}",
        },
    )

    # Reload what was written, to be sure the files alone reproduce the logits.
    reloaded = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    diff = (again - logits).abs().max().item()
    if diff != 0.0:
        sys.exit(f"reloaded model differs from the saved logits by {diff}")

    with safetensors.safe_open(str(out / "model.safetensors"), framework="np") as f:
        names = list(f.keys())
        shapes = {n: list(f.get_slice(n).get_shape()) for n in names}
        dtypes = sorted({f.get_slice(n).get_dtype() for n in names})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}")
    print(f"  torch {torch.__version__}, transformers {transformers.__version__}, "
          f"safetensors {safetensors.__version__}, numpy {np.__version__}")
    print(f"  config: {json.dumps({k: CONFIG[k] for k in ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head')})}")
    print(f"  parameters: {n_params} (lm_head tied to wte)")
    print(f"  model.safetensors: {len(names)} tensors, dtypes {dtypes}")
    for n in names:
        print(f"    {n} {shapes[n]}")
    print(f"  lm_head.weight saved: {'lm_head.weight' in names}")
    print(f"  input_ids {list(ids.shape)}: {ids.tolist()}")
    print(f"  logits {list(logits.shape)}: mean {logits.mean():.4f} std {logits.std():.4f} "
          f"min {logits.min():.4f} max {logits.max():.4f}")
    print(f"  loss (labels = input_ids): {loss.item():.6f}")
    print(f"  reload check: max |logits diff| = {diff}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}: {p.stat().st_size} bytes")


def check(dir_: Path, ids_json: str | None, compare: Path | None, tol: float) -> int:
    model, info = GPT2LMHeadModel.from_pretrained(
        dir_, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    # A tied head is rebuilt from wte, so its absence is expected; anything else is a naming bug.
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    problems = {
        "missing_keys": missing,
        "unexpected_keys": list(info.get("unexpected_keys", [])),
        "mismatched_keys": [list(map(str, m)) for m in info.get("mismatched_keys", [])],
    }
    report: dict = {"dir": str(dir_), "loading": problems}

    expected = None
    if compare is not None:
        expected = load_file(str(compare))
        for key in ("input_ids", "logits"):
            if key not in expected:
                sys.exit(f"{compare}: no tensor named {key!r} (has {sorted(expected)})")
    if ids_json is not None:
        ids = torch.tensor(json.loads(ids_json), dtype=torch.int64)
    elif expected is not None:
        ids = torch.from_numpy(expected["input_ids"].astype(np.int64))
    else:
        sys.exit("--check needs --ids JSON or --compare FILE")
    if ids.dim() != 2:
        sys.exit(f"input ids must be [batch, seq], got shape {list(ids.shape)}")

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    report["input_ids"] = ids.tolist()
    report["logits_shape"] = list(logits.shape)
    report["logits"] = logits.tolist()

    ok = not any(problems.values())
    if expected is not None:
        theirs = torch.from_numpy(expected["logits"].astype(np.float32))
        if list(theirs.shape) != list(logits.shape):
            report["compare"] = {"file": str(compare), "error": f"shape {list(theirs.shape)} vs {list(logits.shape)}"}
            ok = False
        else:
            max_diff = (theirs - logits).abs().max().item()
            report["compare"] = {"file": str(compare), "max_abs_diff": max_diff, "tol": tol}
            ok = ok and max_diff <= tol
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture directory to write")
    ap.add_argument("--check", type=Path, metavar="DIR", help="load a checkpoint directory instead")
    ap.add_argument("--ids", help="with --check: input ids as JSON, e.g. '[[1,2,3],[4,5,6]]'")
    ap.add_argument("--compare", type=Path, help="with --check: safetensors file with input_ids and logits")
    ap.add_argument("--tol", type=float, default=1e-4, help="with --compare: largest allowed |diff|")
    args = ap.parse_args()
    torch.set_num_threads(1)  # results independent of the machine's core count
    if args.check is not None:
        return check(args.check, args.ids, args.compare, args.tol)
    write_fixture(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
