//! Every way a safetensors header can be malformed, each with the message checked to name the
//! file and the problem.

use std::path::Path;

use rlhf_tensor::safetensors::{parse_header, MappedFile, MAX_HEADER_LEN};
use rlhf_tensor::Error;

const PATH: &str = "dir/model.safetensors";

/// A file from a header text and a data section.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Parses `bytes`, expects a Safetensors error naming the file, and checks each fragment.
#[track_caller]
fn expect_err(bytes: &[u8], fragments: &[&str]) {
    let err = parse_header(bytes, Path::new(PATH)).expect_err("malformed file was accepted");
    assert!(matches!(err, Error::Safetensors { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(PATH), "message does not name the file: {msg}");
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} should contain {f:?}");
    }
}

#[test]
fn file_shorter_than_the_length_field() {
    for len in 0..8 {
        expect_err(
            &vec![0u8; len],
            &[&format!("file is {len} bytes, shorter than the 8-byte")],
        );
    }
}

#[test]
fn empty_file_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.safetensors");
    std::fs::write(&path, b"").unwrap();
    let msg = MappedFile::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("empty.safetensors") && msg.contains("file is 0 bytes"),
        "{msg}"
    );
}

#[test]
fn header_length_larger_than_the_file() {
    let mut v = file("{}", &[]);
    v[..8].copy_from_slice(&10u64.to_le_bytes());
    expect_err(
        &v,
        &["header length field says 10 bytes but only 2 bytes follow"],
    );
}

#[test]
fn header_length_absurd() {
    for n in [MAX_HEADER_LEN + 1, u64::MAX] {
        let mut v = file("{}", &[]);
        v[..8].copy_from_slice(&n.to_le_bytes());
        expect_err(&v, &[&format!("says {n} bytes, more than the limit")]);
    }
}

#[test]
fn header_not_utf8() {
    let mut v = file("{\"a\u{e9}\":1}", &[]);
    // Cut the two-byte é in half.
    v[11] = 0xff;
    expect_err(&v, &["not valid UTF-8", "offset 3"]);
}

#[test]
fn header_not_json() {
    expect_err(&file("{\"a\":", &[]), &["not valid JSON"]);
    expect_err(&file("", &[]), &["not valid JSON"]);
    expect_err(&file("{} x", &[]), &["not valid JSON"]);
    // Nesting beyond serde_json's recursion limit is an error, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    expect_err(&file(&deep, &[]), &["not valid JSON"]);
}

#[test]
fn header_not_an_object() {
    expect_err(
        &file("[1, 2]", &[]),
        &["header must be a JSON object, found an array"],
    );
    expect_err(&file("\"x\"", &[]), &["found a string"]);
    expect_err(&file("null", &[]), &["found null"]);
}

#[test]
fn tensor_entry_not_an_object() {
    expect_err(
        &file(r#"{"w":[1]}"#, &[]),
        &["tensor \"w\": entry must be a JSON object"],
    );
}

#[test]
fn unknown_or_bad_dtype() {
    expect_err(
        &file(
            r#"{"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
        &["tensor \"w\": unsupported dtype \"F64\""],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        &["tensor \"w\": dtype must be a string, found a number"],
    );
}

#[test]
fn bad_shape_entries() {
    let cases = [
        ("[-1]", "shape[0] must be a non-negative integer, found -1"),
        (
            "[2, 1.5]",
            "shape[1] must be a non-negative integer, found 1.5",
        ),
        (
            "[2, \"3\"]",
            "shape[1] must be a non-negative integer, found the string \"3\"",
        ),
        ("[1e30]", "shape[0] must be a non-negative integer"),
        (
            "[99999999999999999999999]",
            "shape[0] must be a non-negative integer",
        ),
        ("[true]", "found true"),
        (
            "3",
            "shape must be an array of non-negative integers, found a number",
        ),
    ];
    for (shape, want) in cases {
        let h = format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,4]}}}}"#);
        expect_err(&file(&h, &[0; 4]), &["tensor \"w\"", want]);
    }
}

#[test]
fn shape_product_overflow() {
    let big = 1u64 << 32;
    let h = format!(r#"{{"w":{{"dtype":"U8","shape":[{big},{big},{big}],"data_offsets":[0,0]}}}}"#);
    expect_err(
        &file(&h, &[]),
        &["tensor \"w\"", "more elements than fit in usize"],
    );
    // The element count fits but the byte count does not.
    let h = format!(
        r#"{{"w":{{"dtype":"I64","shape":[{}],"data_offsets":[0,0]}}}}"#,
        1u64 << 62
    );
    expect_err(
        &file(&h, &[]),
        &["tensor \"w\"", "of I64 is more bytes than fit in usize"],
    );
}

#[test]
fn size_does_not_match_offsets() {
    expect_err(
        &file(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
        &["tensor \"w\": data_offsets [0, 8] span 8 bytes but shape [3] of F32 needs 12"],
    );
}

#[test]
fn begin_after_end() {
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[8,4]}}"#,
            &[0; 8],
        ),
        &["tensor \"w\": data_offsets [8, 4] have begin after end"],
    );
}

#[test]
fn bad_offsets_shape() {
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4,4]}}"#,
            &[0; 4],
        ),
        &["tensor \"w\": data_offsets must be [begin, end], found 3 entries"],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[-4,0]}}"#,
            &[0; 4],
        ),
        &["tensor \"w\": data_offsets[0] must be a non-negative integer, found -4"],
    );
}

#[test]
fn end_past_the_data_section() {
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
            &[0; 6],
        ),
        &["tensor \"w\": data_offsets [4, 8] end past the 6-byte data section"],
    );
    // Offsets near u64::MAX must not wrap anything around.
    let m = u64::MAX;
    let h = format!(
        r#"{{"w":{{"dtype":"U8","shape":[1],"data_offsets":[{},{m}]}}}}"#,
        m - 1
    );
    expect_err(&file(&h, &[0; 4]), &["end past the 4-byte data section"]);
}

#[test]
fn overlapping_tensors() {
    let h = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},
                "b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#;
    expect_err(
        &file(h, &[0; 12]),
        &["tensor \"b\" with data_offsets [4, 12] overlaps tensor \"a\", which ends at data offset 8"],
    );
    // Two tensors sharing the same bytes (an aliasing trick some writers might try).
    let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    expect_err(&file(h, &[0; 4]), &["overlaps tensor"]);
    // An empty tensor inside another one's bytes.
    let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "e":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#;
    expect_err(
        &file(h, &[0; 4]),
        &["tensor \"e\" with data_offsets [2, 2] overlaps tensor \"a\""],
    );
}

#[test]
fn gaps_in_the_data_section() {
    let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
    expect_err(
        &file(h, &[0; 12]),
        &["gap of 4 unused bytes at data offsets [4, 8) between the end of tensor \"a\" and tensor \"b\""],
    );
    let h = r#"{"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    expect_err(
        &file(h, &[0; 6]),
        &["gap of 2 unused bytes", "the start of the data section"],
    );
}

#[test]
fn trailing_bytes_after_the_last_tensor() {
    let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    expect_err(
        &file(h, &[0; 7]),
        &["3 unused bytes at the end of the file: tensors cover data offsets [0, 4) of a 7-byte"],
    );
    expect_err(&file("{}", &[1]), &["1 unused bytes at the end"]);
}

#[test]
fn metadata_errors() {
    expect_err(
        &file(r#"{"__metadata__":{"a":"x","k":1}}"#, &[]),
        &["\"__metadata__\" value for key \"k\" must be a string, found a number"],
    );
    expect_err(
        &file(r#"{"__metadata__":["a"]}"#, &[]),
        &["\"__metadata__\" must be a JSON object of strings, found an array"],
    );
    expect_err(
        &file(r#"{"__metadata__":{"k":"a","k":"b"}}"#, &[]),
        &["__metadata__: duplicate key \"k\""],
    );
}

#[test]
fn duplicate_names() {
    let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                "a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
    expect_err(&file(h, &[0; 4]), &["header: duplicate key \"a\""]);
    let h = r#"{"__metadata__":{},"__metadata__":{}}"#;
    expect_err(&file(h, &[]), &["duplicate key \"__metadata__\""]);
    let h = r#"{"a":{"dtype":"U8","dtype":"F32","shape":[4],"data_offsets":[0,4]}}"#;
    expect_err(
        &file(h, &[0; 4]),
        &["tensor \"a\": duplicate key \"dtype\""],
    );
}

#[test]
fn missing_and_unknown_fields() {
    expect_err(
        &file(r#"{"a":{"dtype":"U8","shape":[4]}}"#, &[0; 4]),
        &["tensor \"a\": missing \"data_offsets\""],
    );
    expect_err(
        &file(r#"{"a":{"shape":[4],"data_offsets":[0,4]}}"#, &[0; 4]),
        &["tensor \"a\": missing \"dtype\""],
    );
    expect_err(
        &file(r#"{"a":{"dtype":"U8","data_offsets":[0,4]}}"#, &[0; 4]),
        &["tensor \"a\": missing \"shape\""],
    );
    expect_err(
        &file(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":1}}"#,
            &[0; 4],
        ),
        &["tensor \"a\": unexpected key \"x\""],
    );
}

#[test]
fn valid_edge_cases_are_accepted() {
    // No tensors at all, with and without metadata.
    let h = parse_header(&file("{}", &[]), Path::new(PATH)).unwrap();
    assert!(h.tensors.is_empty() && h.metadata.is_none() && h.data_start == 10);
    let h = parse_header(&file(r#"{"__metadata__":{}}"#, &[]), Path::new(PATH)).unwrap();
    assert_eq!(h.metadata, Some(Default::default()));
    // Empty tensors at the ends and between others, whitespace padding, header in any order.
    let text = r#" {"z":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},
         "e0":{"dtype":"I64","shape":[0,3],"data_offsets":[0,0]},
         "a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
         "e1":{"dtype":"F16","shape":[5,0],"data_offsets":[12,12]},
         "s":{"dtype":"BF16","shape":[],"data_offsets":[12,14]}}    "#;
    let bytes = file(text, &[7; 14]);
    let h = parse_header(&bytes, Path::new(PATH)).unwrap();
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["e0", "a", "z", "e1", "s"]);
    let start = 8 + text.len();
    assert_eq!(h.data_start, start);
    let s = &h.tensors[4];
    assert_eq!(
        (s.begin, s.end, s.shape.clone()),
        (start + 12, start + 14, vec![])
    );
    assert_eq!(s.num_elements(), 1);
    assert_eq!(h.tensors[2].byte_len(), 8);
}
