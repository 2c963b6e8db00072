"""Generates crates/tensor/tests/fixtures/python_reference.safetensors with the Python `safetensors`
package (the reference implementation), then loads it back and checks every value. The Rust test
crates/tensor/tests/safetensors_roundtrip.rs asserts the same literal values: change both together.

Usage (from the repository root, in .tools/venv; tools/check-safetensors-python sets it up):
    python tools/make_safetensors_fixture.py          # (re)write the committed fixture
    python tools/make_safetensors_fixture.py --check  # regenerate to a temp file, compare with it
Requires safetensors, numpy and ml_dtypes (for BF16 without torch).
"""

import json
import os
import struct
import sys
import tempfile

import ml_dtypes
import numpy as np
import safetensors
from safetensors.numpy import save_file

FIXTURE = os.path.join("crates", "tensor", "tests", "fixtures", "python_reference.safetensors")

TENSORS = {
    "weight": ("F32", np.array([[1.0, -2.5, 3.25], [0.0, -0.0, 0.1]], dtype=np.float32)),
    "half": ("F16", np.array([1.0, -0.5, 65504.0], dtype=np.float16)),
    "bf": ("BF16", np.array([[1.0, -2.0], [0.15625, 256.0]], dtype=ml_dtypes.bfloat16)),
    # 2**53 + 1 is not representable as a double: checks the integers never pass through floats.
    "tokens": ("I64", np.array([0, 50256, -1, 2**53 + 1], dtype=np.int64)),
    "i32": ("I32", np.array([-(2**31), 123], dtype=np.int32)),
    "u32": ("U32", np.array([3_000_000_000], dtype=np.uint32)),
    "mask": ("U8", np.array([0, 1, 255], dtype=np.uint8)),
    "nothing": ("F32", np.zeros((0,), dtype=np.float32)),
}
METADATA = {"format": "np", "source": "tools/make_safetensors_fixture.py"}
NP = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
      "I32": np.int32, "U32": np.uint32, "U8": np.uint8}


def split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def check_values(path: str) -> None:
    """Loads `path` back with the reference reader and asserts every tensor and the metadata."""
    with open(path, "rb") as f:
        raw = f.read()
    loaded = dict(safetensors.deserialize(raw))
    assert set(loaded) == set(TENSORS), sorted(loaded)
    for name, (dtype, want) in TENSORS.items():
        got = loaded[name]
        assert got["dtype"] == dtype, (name, got["dtype"])
        assert list(got["shape"]) == list(want.shape), (name, got["shape"])
        arr = np.frombuffer(bytes(got["data"]), dtype=NP[dtype]).reshape(got["shape"])
        assert arr.tobytes() == want.tobytes(), (name, arr, want)
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == METADATA, f.metadata()


def generate(path: str) -> None:
    save_file({k: v for k, (_, v) in TENSORS.items()}, path, metadata=METADATA)
    check_values(path)


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        with tempfile.TemporaryDirectory() as d:
            fresh = os.path.join(d, "fresh.safetensors")
            generate(fresh)
            with open(fresh, "rb") as f:
                a = split(f.read())
        with open(FIXTURE, "rb") as f:
            b = split(f.read())
        check_values(FIXTURE)
        # Headers compared as JSON: the reference keeps metadata in a hash map, so the order of
        # the two metadata keys (and nothing else) may differ between runs.
        if a != b:
            print(f"FAIL: {FIXTURE} differs from what this script generates; rerun it without --check")
            return 1
        print(f"{FIXTURE}: matches the generator, {len(TENSORS)} tensors checked")
        return 0
    if sys.argv[1:]:
        print(__doc__)
        return 2
    generate(FIXTURE)
    print(f"wrote {FIXTURE} (safetensors {safetensors.__version__}, numpy {np.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
