//! Safetensors writing and reading: round trips for every dtype, the layout the writer promises,
//! a fixture written by the Python `safetensors` package, and the atomic write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rlhf_tensor::safetensors::{parse_header, serialize, write, MappedFile, RawTensor};
use rlhf_tensor::{DType, Error};

const ALL_DTYPES: [DType; 7] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::I64,
    DType::I32,
    DType::U32,
    DType::U8,
];

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
fn pseudo_random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

struct Owned {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Owned {
    fn new(name: &str, dtype: DType, shape: &[usize], seed: u64) -> Self {
        let n: usize = shape.iter().product();
        Owned {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data: pseudo_random_bytes(seed, n * dtype.size_in_bytes()),
        }
    }
    fn raw(&self) -> RawTensor<'_> {
        RawTensor {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// Writes `tensors`, reads the file back and checks everything the writer promises.
fn round_trip(
    dir: &Path,
    file: &str,
    tensors: &[Owned],
    metadata: Option<&BTreeMap<String, String>>,
) {
    let path = dir.join(file);
    let raws: Vec<RawTensor<'_>> = tensors.iter().map(Owned::raw).collect();
    write(&path, &raws, metadata).unwrap();
    let mapped = MappedFile::open(&path).unwrap();
    let header = mapped.header();

    assert_eq!(header.metadata.as_ref(), metadata);
    assert_eq!(header.tensors.len(), tensors.len());
    assert_eq!(
        header.data_start % 8,
        0,
        "data section must start 8-aligned"
    );
    for t in tensors {
        let info = mapped
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(info.dtype, t.dtype, "{}", t.name);
        assert_eq!(info.shape, t.shape, "{}", t.name);
        assert_eq!(mapped.tensor_bytes(info), &t.data[..], "{}", t.name);
        assert_eq!(
            info.begin % t.dtype.size_in_bytes(),
            0,
            "{} at offset {} is not aligned to its {} element size",
            t.name,
            info.begin,
            t.dtype
        );
    }
    // In-memory serialization gives the very same bytes as the file.
    assert_eq!(serialize(&raws, metadata).unwrap(), mapped.bytes());
    // Tensors are reported in file order.
    assert!(header.tensors.windows(2).all(|w| w[0].end == w[1].begin));
}

#[test]
fn round_trip_each_dtype_alone() {
    let dir = tempfile::tempdir().unwrap();
    for (i, &dtype) in ALL_DTYPES.iter().enumerate() {
        let tensors = [
            Owned::new("a", dtype, &[3, 7], i as u64),
            Owned::new("b.scalar", dtype, &[], 100 + i as u64),
            Owned::new("c.empty", dtype, &[4, 0, 2], 0),
            Owned::new("d", dtype, &[1, 1, 5], 200 + i as u64),
        ];
        let meta = BTreeMap::from([("dtype".to_string(), dtype.to_string())]);
        round_trip(
            dir.path(),
            &format!("{dtype}.safetensors"),
            &tensors,
            Some(&meta),
        );
    }
}

#[test]
fn round_trip_all_dtypes_mixed_with_odd_sizes() {
    // Odd element counts make the narrow dtypes end at unaligned offsets; the widest-first order
    // must still put every tensor at a multiple of its element size.
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<Owned> = ALL_DTYPES
        .iter()
        .enumerate()
        .flat_map(|(i, &d)| {
            [
                Owned::new(&format!("z{i}"), d, &[3], i as u64),
                Owned::new(&format!("a{i}"), d, &[5, 1], 10 + i as u64),
            ]
        })
        .collect();
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "ünïcode".to_string(),
            "\"quotes\" and\nnewlines\t\u{1}".to_string(),
        ),
        (String::new(), String::new()),
    ]);
    round_trip(dir.path(), "mixed.safetensors", &tensors, Some(&meta));
}

#[test]
fn round_trip_metadata_none_and_empty_and_no_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let one = [Owned::new("x", DType::F32, &[2], 1)];
    round_trip(dir.path(), "none.safetensors", &one, None);
    round_trip(
        dir.path(),
        "empty_meta.safetensors",
        &one,
        Some(&BTreeMap::new()),
    );
    round_trip(dir.path(), "nothing.safetensors", &[], None);
    let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
    round_trip(dir.path(), "only_meta.safetensors", &[], Some(&meta));
}

#[test]
fn writer_layout_matches_the_reference_order() {
    // Widest dtype first (reference enum order I64, F32, U32, I32, BF16, F16, U8), then by name.
    let tensors = [
        Owned::new("u8", DType::U8, &[3], 1),
        Owned::new("f16", DType::F16, &[1], 2),
        Owned::new("bf16", DType::BF16, &[1], 3),
        Owned::new("i32", DType::I32, &[1], 4),
        Owned::new("u32", DType::U32, &[1], 5),
        Owned::new("f32.b", DType::F32, &[1], 6),
        Owned::new("f32.a", DType::F32, &[1], 7),
        Owned::new("i64", DType::I64, &[1], 8),
    ];
    let raws: Vec<_> = tensors.iter().map(Owned::raw).collect();
    let bytes = serialize(&raws, None).unwrap();
    let header = parse_header(&bytes, Path::new("mem")).unwrap();
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["i64", "f32.a", "f32.b", "u32", "i32", "bf16", "f16", "u8"]
    );
    // The exact JSON text, as the reference writer formats it (compact, padded with spaces).
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    assert!(
        text.starts_with(r#"{"i64":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"f32.a":"#),
        "{text}"
    );
    assert!(text
        .trim_end()
        .ends_with(r#""u8":{"dtype":"U8","shape":[3],"data_offsets":[28,31]}}"#));
    assert_eq!(n % 8, 0);
}

// ---- the fixture written by the Python reference implementation ----

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python_reference.safetensors")
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The values tools/make_safetensors_fixture.py writes (keep in sync with it).
#[test]
fn python_fixture_loads_with_expected_values() {
    let m = MappedFile::open(&fixture_path()).unwrap();
    let t = |name: &str, dtype: DType, shape: &[usize]| -> Vec<u8> {
        let info = m.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(info.dtype, dtype, "{name}");
        assert_eq!(info.shape, shape, "{name}");
        m.tensor_bytes(info).to_vec()
    };

    let weight = le_f32(&t("weight", DType::F32, &[2, 3]));
    let want = [1.0f32, -2.5, 3.25, 0.0, -0.0, 0.1];
    assert_eq!(
        weight.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );

    let half: Vec<f32> = t("half", DType::F16, &[3])
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(half, [1.0, -0.5, 65504.0]);

    let bf: Vec<f32> = t("bf", DType::BF16, &[2, 2])
        .chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(bf, [1.0, -2.0, 0.15625, 256.0]);

    let tokens: Vec<i64> = t("tokens", DType::I64, &[4])
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(tokens, [0, 50256, -1, (1 << 53) + 1]);

    let i32s: Vec<i32> = t("i32", DType::I32, &[2])
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(i32s, [i32::MIN, 123]);
    assert_eq!(t("u32", DType::U32, &[1]), 3_000_000_000u32.to_le_bytes());
    assert_eq!(t("mask", DType::U8, &[3]), [0, 1, 255]);
    assert_eq!(t("nothing", DType::F32, &[0]), Vec::<u8>::new());
    assert_eq!(m.tensors().len(), 8);

    let meta = m.header().metadata.clone().unwrap();
    assert_eq!(
        meta,
        BTreeMap::from([
            ("format".to_string(), "np".to_string()),
            (
                "source".to_string(),
                "tools/make_safetensors_fixture.py".to_string()
            ),
        ])
    );
}

#[test]
fn our_writer_reproduces_the_python_fixture_layout() {
    // Re-serialize the fixture's tensors here: same header entries (order, offsets), same header
    // length, same data section. Only the metadata key order may differ (the reference keeps
    // metadata in a hash map), so the headers are compared parsed.
    let m = MappedFile::open(&fixture_path()).unwrap();
    // Feed the tensors in a scrambled order: the writer's order must not depend on the input's.
    let mut infos: Vec<_> = m.tensors().iter().collect();
    infos.reverse();
    infos.rotate_left(3);
    let raws: Vec<RawTensor<'_>> = infos
        .iter()
        .map(|i| RawTensor {
            name: &i.name,
            dtype: i.dtype,
            shape: &i.shape,
            data: m.tensor_bytes(i),
        })
        .collect();
    let ours = serialize(&raws, m.header().metadata.as_ref()).unwrap();
    let ours_header = parse_header(&ours, Path::new("ours")).unwrap();
    assert_eq!(&ours_header, m.header());
    assert_eq!(
        ours[ours_header.data_start..],
        m.bytes()[m.header().data_start..]
    );
}

// ---- MappedFile ----

#[test]
fn mapped_file_clones_share_the_mapping_and_get_finds_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let a = Owned::new("a", DType::F32, &[4], 1);
    write(&path, &[a.raw()], None).unwrap();
    let m = MappedFile::open(&path).unwrap();
    let c = m.clone();
    drop(m);
    assert_eq!(c.path(), path);
    assert_eq!(c.tensor_bytes(c.get("a").unwrap()), &a.data[..]);
    assert!(c.get("b").is_none());
    assert!(c.get("__metadata__").is_none());
    assert_eq!(
        c.bytes().as_ptr().align_offset(8),
        0,
        "mapping is page-aligned"
    );
}

#[test]
fn open_missing_file_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.safetensors");
    let err = MappedFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}

// ---- atomic write ----

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn write_replaces_an_existing_file_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let a = Owned::new("a", DType::F32, &[4], 1);
    write(&path, &[a.raw()], None).unwrap();
    // A reader holding the old file keeps seeing the old contents after the replacement
    // (rename gives the new file a new inode).
    let old = MappedFile::open(&path).unwrap();
    let b = Owned::new("b", DType::I64, &[2, 2], 2);
    write(&path, &[b.raw()], None).unwrap();
    let new = MappedFile::open(&path).unwrap();
    assert!(new.get("a").is_none());
    assert_eq!(new.tensor_bytes(new.get("b").unwrap()), &b.data[..]);
    assert_eq!(old.tensor_bytes(old.get("a").unwrap()), &a.data[..]);
    assert_eq!(dir_entries(dir.path()), ["ckpt.safetensors"]);
}

#[test]
fn failed_write_leaves_the_old_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let a = Owned::new("a", DType::F32, &[4], 1);
    write(&path, &[a.raw()], None).unwrap();
    let before = std::fs::read(&path).unwrap();
    let bad = RawTensor {
        name: "bad",
        dtype: DType::F32,
        shape: &[3],
        data: &[0u8; 8],
    };
    let err = write(&path, &[a.raw(), bad], None).unwrap_err();
    assert!(err.to_string().contains("\"bad\""), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), ["ckpt.safetensors"]);
}

#[test]
fn write_into_a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/x.safetensors");
    let err = write(&path, &[], None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn write_rejects_invalid_tensors() {
    let x = [0u8; 8];
    let cases: Vec<(Vec<RawTensor<'_>>, &str)> = vec![
        (
            vec![
                RawTensor {
                    name: "a",
                    dtype: DType::U8,
                    shape: &[8],
                    data: &x,
                },
                RawTensor {
                    name: "a",
                    dtype: DType::U8,
                    shape: &[8],
                    data: &x,
                },
            ],
            "duplicate tensor name \"a\"",
        ),
        (
            vec![RawTensor {
                name: "__metadata__",
                dtype: DType::U8,
                shape: &[8],
                data: &x,
            }],
            "reserved for metadata",
        ),
        (
            vec![RawTensor {
                name: "short",
                dtype: DType::F32,
                shape: &[3],
                data: &x,
            }],
            "tensor \"short\": 8 bytes of data but shape [3] of F32 needs 12 bytes",
        ),
        (
            vec![RawTensor {
                name: "huge",
                dtype: DType::F32,
                shape: &[usize::MAX, 2],
                data: &x,
            }],
            "more bytes than fit in usize",
        ),
    ];
    for (tensors, want) in cases {
        let err = serialize(&tensors, None).unwrap_err();
        assert!(
            err.to_string().contains(want),
            "{err} should contain {want}"
        );
    }
}
