//! Writes a safetensors file with one tensor of every dtype (plus special values, a scalar, an
//! empty tensor and a non-ASCII name) and metadata, for tools/check-safetensors-python, which
//! loads it with the Python `safetensors` package and checks every value. The values are defined
//! here and, independently, in tools/check_safetensors_python.py: change both together.
//!
//! Usage: cargo run --release -p rlhf-tensor --example write_safetensors -- OUT.safetensors

// bytemuck::cast_slice gives native-endian bytes; safetensors data is little-endian.
#[cfg(target_endian = "big")]
compile_error!("write_safetensors assumes a little-endian host");

use std::collections::BTreeMap;
use std::path::PathBuf;

use half::{bf16, f16};
use rlhf_tensor::safetensors::{write, RawTensor};
use rlhf_tensor::DType;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: write_safetensors OUT.safetensors")?
        .into();

    let matrix: Vec<f32> = (0..15).map(|i| i as f32 * 0.25 - 1.5).collect();
    let special: Vec<f32> = [
        0x0000_0000u32, // +0
        0x8000_0000,    // -0
        0x7f80_0000,    // +inf
        0xff80_0000,    // -inf
        0x7fc0_0001,    // NaN with a payload: must survive bit for bit
        0x0000_0001,    // smallest subnormal
    ]
    .map(f32::from_bits)
    .to_vec();
    let scalar = [3.5f32];
    let named = [1.0f32];
    let bf: Vec<bf16> = (0..6)
        .map(|i| bf16::from_f32(i as f32 * 0.5 - 1.0))
        .collect();
    let hf: Vec<f16> = [2.0f32, 2.125, -65504.0, 6.103_515_6e-5]
        .map(f16::from_f32)
        .to_vec();
    let ids: [i64; 4] = [-(1 << 40), 0, 1 << 62, -1];
    let i32s: [i32; 3] = [-7, 0, i32::MAX];
    let u32s: [u32; 2] = [0, u32::MAX];
    let bytes: Vec<u8> = (0..8u32).map(|i| (i * 37 % 256) as u8).collect();

    let tensors = [
        RawTensor {
            name: "embed.weight",
            dtype: DType::F32,
            shape: &[3, 5],
            data: bytemuck::cast_slice(&matrix),
        },
        RawTensor {
            name: "f32.special",
            dtype: DType::F32,
            shape: &[6],
            data: bytemuck::cast_slice(&special),
        },
        RawTensor {
            name: "scalar",
            dtype: DType::F32,
            shape: &[],
            data: bytemuck::cast_slice(&scalar),
        },
        RawTensor {
            name: "empty",
            dtype: DType::F32,
            shape: &[0, 4],
            data: &[],
        },
        RawTensor {
            name: "h.bf16",
            dtype: DType::BF16,
            shape: &[2, 3],
            data: bytemuck::cast_slice(&bf),
        },
        RawTensor {
            name: "h.f16",
            dtype: DType::F16,
            shape: &[4],
            data: bytemuck::cast_slice(&hf),
        },
        RawTensor {
            name: "ids",
            dtype: DType::I64,
            shape: &[2, 2],
            data: bytemuck::cast_slice(&ids),
        },
        RawTensor {
            name: "i32",
            dtype: DType::I32,
            shape: &[3],
            data: bytemuck::cast_slice(&i32s),
        },
        RawTensor {
            name: "u32",
            dtype: DType::U32,
            shape: &[2],
            data: bytemuck::cast_slice(&u32s),
        },
        RawTensor {
            name: "bytes",
            dtype: DType::U8,
            shape: &[2, 2, 2],
            data: &bytes,
        },
        RawTensor {
            name: "ünïcode \"name\"",
            dtype: DType::F32,
            shape: &[1],
            data: bytemuck::cast_slice(&named),
        },
    ];
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("note".to_string(), "héllo \"quoted\"\nline".to_string()),
    ]);
    write(&out, &tensors, Some(&metadata))?;
    println!("wrote {}", out.display());
    Ok(())
}
