"""Checks that a file written by this project's safetensors writer loads in the Python
`safetensors` package with the right names, dtypes, shapes, metadata and values, and that the
reference writer lays out the same tensors identically (same header entries and data bytes).

Usage: python tools/check_safetensors_python.py FILE
(FILE from `cargo run --release -p rlhf-tensor --example write_safetensors -- FILE`; the expected
values below are defined independently of that example and must change with it.)
"""

import json
import struct
import sys

import ml_dtypes
import numpy as np
import safetensors
from safetensors import safe_open
from safetensors.numpy import save

F32_SPECIAL_BITS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x00000001]

EXPECTED = {
    "embed.weight": ("F32", np.arange(15, dtype=np.float32).reshape(3, 5) * np.float32(0.25) - np.float32(1.5)),
    "f32.special": ("F32", np.array(F32_SPECIAL_BITS, dtype=np.uint32).view(np.float32)),
    "scalar": ("F32", np.array(3.5, dtype=np.float32)),
    "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
    "h.bf16": ("BF16", (np.arange(6, dtype=np.float32) * 0.5 - 1.0).astype(ml_dtypes.bfloat16).reshape(2, 3)),
    "h.f16": ("F16", np.array([2.0, 2.125, -65504.0, 2.0**-14], dtype=np.float16)),
    "ids": ("I64", np.array([[-(1 << 40), 0], [1 << 62, -1]], dtype=np.int64)),
    "i32": ("I32", np.array([-7, 0, 2**31 - 1], dtype=np.int32)),
    "u32": ("U32", np.array([0, 2**32 - 1], dtype=np.uint32)),
    "bytes": ("U8", (np.arange(8) * 37 % 256).astype(np.uint8).reshape(2, 2, 2)),
    'ünïcode "name"': ("F32", np.array([1.0], dtype=np.float32)),
}
EXPECTED_METADATA = {"format": "pt", "note": 'héllo "quoted"\nline'}
NP_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "U32": np.uint32, "U8": np.uint8,
}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def main() -> int:
    path = sys.argv[1]
    failures = []
    with open(path, "rb") as f:
        raw = f.read()

    # 1. The generic deserializer: names, dtypes, shapes and raw bytes of every tensor.
    loaded = dict(safetensors.deserialize(raw))
    if set(loaded) != set(EXPECTED):
        failures.append(f"names: got {sorted(loaded)}, expected {sorted(EXPECTED)}")
    for name, (dtype, want) in EXPECTED.items():
        if name not in loaded:
            continue
        got = loaded[name]
        if got["dtype"] != dtype:
            failures.append(f"{name}: dtype {got['dtype']}, expected {dtype}")
            continue
        if list(got["shape"]) != list(want.shape):
            failures.append(f"{name}: shape {got['shape']}, expected {list(want.shape)}")
            continue
        arr = np.frombuffer(bytes(got["data"]), dtype=NP_DTYPES[dtype]).reshape(got["shape"])
        if not same_bits(arr, want):
            failures.append(f"{name}: values {arr!r}, expected {want!r}")

    # 2. safe_open: metadata, and the numpy loader for the dtypes numpy has natively.
    with safe_open(path, framework="np") as f:
        if f.metadata() != EXPECTED_METADATA:
            failures.append(f"metadata: got {f.metadata()!r}, expected {EXPECTED_METADATA!r}")
        for name, (dtype, want) in EXPECTED.items():
            if dtype == "BF16":
                continue  # numpy has no bfloat16; checked through deserialize above
            got = f.get_tensor(name)
            if not same_bits(got, want):
                failures.append(f"safe_open {name}: {got!r}, expected {want!r}")

    # 3. Layout: the reference writer, given the same tensors, produces the same header entries
    # (so the same order and offsets), the same header length and the same data bytes.
    ours_n = struct.unpack("<Q", raw[:8])[0]
    if ours_n % 8 != 0:
        failures.append(f"header length {ours_n} is not a multiple of 8")
    # (The arrays are already C-contiguous; np.ascontiguousarray would turn the 0-d one into 1-d.)
    ref = save({k: v for k, (_, v) in EXPECTED.items()}, metadata=EXPECTED_METADATA)
    ref_n = struct.unpack("<Q", ref[:8])[0]
    if json.loads(raw[8 : 8 + ours_n]) != json.loads(ref[8 : 8 + ref_n]):
        failures.append(
            f"header differs from the reference writer's:\n  ours {raw[8:8 + ours_n]!r}\n  ref  {ref[8:8 + ref_n]!r}"
        )
    if ours_n != ref_n or raw[8 + ours_n :] != ref[8 + ref_n :]:
        failures.append(f"header length ({ours_n} vs {ref_n}) or data section differs from the reference writer's")

    for msg in failures:
        print("FAIL:", msg)
    checked = len(EXPECTED)
    print(f"safetensors python interop: {checked} tensors checked, {len(failures)} failures "
          f"(safetensors {safetensors.__version__}, numpy {np.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
