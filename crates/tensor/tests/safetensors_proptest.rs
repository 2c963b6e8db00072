//! Property tests: whatever the bytes, `parse_header` returns (never panics), and whatever it
//! accepts satisfies the invariants readers rely on (every tensor in bounds, sizes consistent,
//! the data section tiled exactly).

use std::path::Path;

use proptest::prelude::*;
use rlhf_tensor::safetensors::{parse_header, serialize, Header, RawTensor};
use rlhf_tensor::DType;

const DTYPES: [DType; 7] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::I64,
    DType::I32,
    DType::U32,
    DType::U8,
];

/// Checks what an accepted header promises about `bytes`.
fn check_invariants(bytes: &[u8], h: &Header) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(h.data_start, 8 + n);
    let mut covered = h.data_start;
    for t in &h.tensors {
        assert_eq!(
            t.begin, covered,
            "{} does not start where the previous ended",
            t.name
        );
        assert!(
            t.begin <= t.end && t.end <= bytes.len(),
            "{} out of bounds",
            t.name
        );
        let elems = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap();
        assert_eq!(
            t.end - t.begin,
            elems * t.dtype.size_in_bytes(),
            "{}",
            t.name
        );
        covered = t.end;
    }
    assert_eq!(covered, bytes.len());
}

fn parse(bytes: &[u8]) -> Result<Header, rlhf_tensor::Error> {
    let r = parse_header(bytes, Path::new("prop.safetensors"));
    if let Ok(h) = &r {
        check_invariants(bytes, h);
    }
    r
}

/// A valid file: up to 5 tensors of random dtypes and small shapes (zeros included) with random
/// data, optionally with metadata.
fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    let tensor = (
        0..DTYPES.len(),
        prop::collection::vec(0usize..4, 0..4),
        any::<u64>(),
    );
    (
        prop::collection::vec(tensor, 0..5),
        prop::option::of(prop::collection::btree_map(
            "[a-z\"\\\\é]{0,4}",
            ".{0,6}",
            0..3,
        )),
    )
        .prop_map(|(specs, metadata)| {
            let owned: Vec<(String, DType, Vec<usize>, Vec<u8>)> = specs
                .into_iter()
                .enumerate()
                .map(|(i, (d, shape, seed))| {
                    let dtype = DTYPES[d];
                    let len = shape.iter().product::<usize>() * dtype.size_in_bytes();
                    let data = (0..len)
                        .map(|j| (seed.rotate_left(j as u32 % 64) >> 7) as u8)
                        .collect();
                    (format!("t{i}.w"), dtype, shape, data)
                })
                .collect();
            let raws: Vec<RawTensor<'_>> = owned
                .iter()
                .map(|(name, dtype, shape, data)| RawTensor {
                    name,
                    dtype: *dtype,
                    shape,
                    data,
                })
                .collect();
            serialize(&raws, metadata.as_ref()).unwrap()
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (index taken modulo the length) with a nonzero mask.
    Flip(usize, u8),
    /// Cut the file to `len % original length` bytes.
    Truncate(usize),
    /// Add a nonzero delta to the header length field.
    Length(i64),
    /// Overwrite one byte of the header with a JSON-significant character.
    HeaderChar(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop_oneof![-64i64..=64, any::<i64>()]
            .prop_filter("nonzero", |d| *d != 0)
            .prop_map(Mutation::Length),
        (
            any::<usize>(),
            prop::sample::select(b"{}[],:\"-0123456789 e.".to_vec())
        )
            .prop_map(|(i, c)| Mutation::HeaderChar(i, c)),
    ]
}

/// A JSON value shaped like a header: objects whose keys come from the format's vocabulary,
/// numbers at the edges (negative, huge, fractional), dtype names valid and not.
fn header_like_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0u64..40).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e3f64..1e3).prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "F32", "BF16", "F16", "I64", "I32", "U32", "U8", "F64", "", "f32"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop::sample::select(vec![
            "dtype",
            "shape",
            "data_offsets",
            "__metadata__",
            "a",
            "b",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((key, inner), 0..5).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn random_bytes_behind_a_plausible_length_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..256),
        slack in 0usize..16,
    ) {
        // A length field that fits the file, so the UTF-8 and JSON stages see random input too.
        let n = body.len().saturating_sub(slack) as u64;
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let _ = parse(&bytes);
    }

    #[test]
    fn valid_files_parse(bytes in valid_file()) {
        let h = parse(&bytes).unwrap();
        prop_assert_eq!(h.data_start % 8, 0);
        for t in &h.tensors {
            prop_assert_eq!(t.begin % t.dtype.size_in_bytes(), 0, "{} unaligned", &t.name);
        }
    }

    #[test]
    fn mutated_files_never_panic(bytes in valid_file(), m in mutation()) {
        let mut v = bytes.clone();
        match m {
            Mutation::Flip(i, mask) => {
                let i = i % v.len();
                v[i] ^= mask;
                let _ = parse(&v);
            }
            Mutation::Truncate(len) => {
                v.truncate(len % v.len());
                // Every byte of a valid file is accounted for, so any cut is an error.
                prop_assert!(parse(&v).is_err());
            }
            Mutation::Length(delta) => {
                let n = u64::from_le_bytes(v[..8].try_into().unwrap());
                v[..8].copy_from_slice(&n.wrapping_add_signed(delta).to_le_bytes());
                // The data section changes length while the tensors' total does not.
                prop_assert!(parse(&v).is_err());
            }
            Mutation::HeaderChar(i, c) => {
                let n = u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
                v[8 + i % n] = c;
                let _ = parse(&v);
            }
        }
    }

    #[test]
    fn random_json_headers_never_panic(
        json in header_like_json(),
        data in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        let text = json.to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend_from_slice(&data);
        let r = parse(&bytes);
        // Only an object can be a header.
        if !json.is_object() {
            prop_assert!(r.is_err());
        }
    }

    #[test]
    fn random_tensor_entries_never_panic(
        entries in prop::collection::vec(
            (
                prop::sample::select(vec!["F32", "BF16", "U8", "I64", "F64"]),
                prop::collection::vec(prop_oneof![0u64..5, any::<u64>()], 0..3),
                prop_oneof![0u64..40, any::<u64>()],
                prop_oneof![0u64..40, any::<u64>()],
            ),
            0..4,
        ),
        data_len in 0usize..40,
    ) {
        // Well-formed entries with random numbers: exercises the overflow, size, bounds and
        // tiling checks rather than the JSON parser.
        let body: Vec<String> = entries
            .iter()
            .enumerate()
            .map(|(i, (dtype, shape, b, e))| {
                format!(r#""t{i}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{b},{e}]}}"#)
            })
            .collect();
        let text = format!("{{{}}}", body.join(","));
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.resize(bytes.len() + data_len, 0xAB);
        let _ = parse(&bytes);
    }
}
