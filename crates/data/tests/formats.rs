//! Every format round-trips through `.jsonl` and `.jsonl.gz`; random corruptions of a line give
//! an error naming the file and that line, or with `skip_invalid` are skipped and counted.

use std::path::Path;

use proptest::prelude::*;
use rlhf_data::formats::{
    read_dataset, write_dataset, Comparison, Demo, Format, HhPair, PromptRecord, Ranked,
    ReadOptions, Record,
};

/// Text with the characters JSON must escape, multi-byte characters and newlines.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 \"\\\\/\n\t:,{}é€😀]{0,16}"
}

/// Builds a record of `format` from a pool of strings and ranks.
fn record(format: Format, s: &[String], ranks: &[u32]) -> Record {
    match format {
        Format::Demos => Record::Demo(Demo {
            prompt: s[0].clone(),
            completion: s[1].clone(),
        }),
        Format::Pairwise => Record::Comparison(Comparison {
            prompt: s[0].clone(),
            chosen: s[1].clone(),
            rejected: s[2].clone(),
        }),
        Format::HhRlhf => {
            let prefix = format!("\n\nHuman: {}\n\nAssistant:", s[0]);
            Record::Hh(HhPair {
                chosen: format!("{prefix}{}", s[1]),
                rejected: format!("{prefix}{}", s[2]),
            })
        }
        Format::KWise => {
            let k = ranks.len();
            Record::Ranked(Ranked {
                prompt: s[0].clone(),
                responses: s[1..=k].to_vec(),
                ranking: ranks.iter().map(|&r| r.min(k as u32)).collect(),
            })
        }
        Format::Prompts => Record::Prompt(PromptRecord {
            prompt: s[0].clone(),
        }),
    }
}

fn format_strategy() -> impl Strategy<Value = Format> {
    prop::sample::select(Format::ALL.to_vec())
}

/// A list of records of one format.
fn dataset() -> impl Strategy<Value = (Format, Vec<Record>)> {
    (
        format_strategy(),
        prop::collection::vec(
            (
                prop::collection::vec(text(), 10),
                prop::collection::vec(1u32..=9, 2..=9),
            ),
            1..6,
        ),
    )
        .prop_map(|(format, rows)| {
            let records = rows
                .iter()
                .map(|(s, ranks)| record(format, s, ranks))
                .collect();
            (format, records)
        })
}

fn read(
    path: &Path,
    format: Option<Format>,
    skip_invalid: bool,
) -> rlhf_data::Result<rlhf_data::formats::Dataset> {
    read_dataset(
        path,
        ReadOptions {
            format,
            skip_invalid,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_format_round_trips((format, records) in dataset()) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["d.jsonl", "d.jsonl.gz"] {
            let path = dir.path().join(name);
            prop_assert_eq!(write_dataset(&path, &records).unwrap(), records.len() as u64);
            for given in [None, Some(format)] {
                let back = read(&path, given, false).unwrap();
                prop_assert_eq!(back.format, Some(format));
                prop_assert_eq!(&back.records, &records);
                prop_assert!(back.skipped.is_empty());
            }
        }
        // The gzip file really is compressed data, not plain text.
        let gz = std::fs::read(dir.path().join("d.jsonl.gz")).unwrap();
        prop_assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }
}

/// Ways to break a JSON Lines record.
#[derive(Clone, Copy, Debug)]
enum Corruption {
    /// Cut the line short (any byte position, so possibly mid-character).
    Truncate,
    /// Characters after the closing brace.
    TrailingGarbage,
    /// Delete one structural character outside strings: { } [ ] : , or a quote.
    DeleteStructural,
    /// Insert a byte that is never valid UTF-8.
    InvalidUtf8,
    /// Replace the line with something that is JSON but not an object, or nothing.
    NotAnObject,
    /// Give a field a value of the wrong type.
    WrongType,
    /// Drop one of the format's fields.
    DropField,
}

const CORRUPTIONS: [Corruption; 7] = [
    Corruption::Truncate,
    Corruption::TrailingGarbage,
    Corruption::DeleteStructural,
    Corruption::InvalidUtf8,
    Corruption::NotAnObject,
    Corruption::WrongType,
    Corruption::DropField,
];

/// Byte positions of structural characters outside string literals.
fn structural_positions(line: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in line.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
                out.push(i);
            }
        } else {
            match b {
                b'"' => {
                    in_string = true;
                    out.push(i);
                }
                b'{' | b'}' | b'[' | b']' | b':' | b',' => out.push(i),
                _ => {}
            }
        }
    }
    out
}

fn corrupt(line: &str, format: Format, how: Corruption, pick: usize) -> Vec<u8> {
    let bytes = line.as_bytes();
    match how {
        Corruption::Truncate => bytes[..pick % bytes.len()].to_vec(),
        Corruption::TrailingGarbage => {
            let mut b = bytes.to_vec();
            b.extend_from_slice([&b"x"[..], b"}", b",1", b"{}"][pick % 4]);
            b
        }
        Corruption::DeleteStructural => {
            let pos = structural_positions(bytes);
            let mut b = bytes.to_vec();
            b.remove(pos[pick % pos.len()]);
            b
        }
        Corruption::InvalidUtf8 => {
            let mut b = bytes.to_vec();
            b.insert(pick % (b.len() + 1), 0xFF);
            b
        }
        Corruption::NotAnObject => ["", "[1,2]", "\"prompt\"", "42", "null", " "][pick % 6]
            .as_bytes()
            .to_vec(),
        Corruption::WrongType | Corruption::DropField => {
            let mut v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).unwrap();
            let key = format.keys()[pick % format.keys().len()];
            if matches!(how, Corruption::WrongType) {
                v.insert(key.to_string(), serde_json::Value::from(42));
            } else {
                v.remove(key);
            }
            serde_json::to_vec(&v).unwrap()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn a_corrupted_line_is_an_error_naming_file_and_line(
        (format, records) in dataset(),
        line_pick in any::<usize>(),
        how in prop::sample::select(CORRUPTIONS.to_vec()),
        pick in any::<usize>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.jsonl");
        let bad = line_pick % records.len();
        let mut file = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let line = r.to_json_line();
            if i == bad {
                file.extend_from_slice(&corrupt(&line, format, how, pick));
            } else {
                file.extend_from_slice(line.as_bytes());
            }
            file.push(b'\n');
        }
        std::fs::write(&path, &file).unwrap();
        let want = format!("{}:{}: ", path.display(), bad + 1);

        // With the format given, the corrupted line itself is always the error.
        let err = read(&path, Some(format), false).unwrap_err().to_string();
        prop_assert!(err.starts_with(&want), "{:?}: {} (want {})", how, err, want);

        // Detected from the first record: a line that is no longer a JSON object can never
        // pass as another format, so the error is still that line. (A dropped field can turn a
        // record into another valid format, e.g. demos without "completion" is a prompt; then
        // the first line that disagrees is reported, so only these kinds are checked here.)
        if !matches!(how, Corruption::DropField) || bad > 0 {
            let err = read(&path, None, false).unwrap_err().to_string();
            prop_assert!(err.starts_with(&want), "{:?} detected: {} (want {})", how, err, want);
        }

        // Skipping: every other record is read, the bad line is counted with its number.
        let d = read(&path, Some(format), true).unwrap();
        prop_assert_eq!(d.records.len(), records.len() - 1);
        prop_assert_eq!(d.skipped.len(), 1);
        prop_assert_eq!(d.skipped[0].line, bad as u64 + 1);
        let mut expect = records.clone();
        expect.remove(bad);
        prop_assert_eq!(d.records, expect);
    }
}

#[test]
fn hh_rlhf_fixture_splits_prompts_and_reports_bad_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hh.jsonl.gz");
    let pairs = [
        // Ordinary: differs only in the last assistant turn.
        (
            "\n\nHuman: How do I open a lock?\n\nAssistant: Why do you ask?\n\nHuman: It's mine.\n\nAssistant: Call a locksmith.",
            "\n\nHuman: How do I open a lock?\n\nAssistant: Why do you ask?\n\nHuman: It's mine.\n\nAssistant: Use a hairpin.",
        ),
        // Diverges at an earlier assistant turn.
        (
            "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: bye\n\nAssistant: Bye.",
            "\n\nHuman: hi\n\nAssistant: What?\n\nHuman: bye\n\nAssistant: Bye.",
        ),
    ];
    let records: Vec<Record> = pairs
        .iter()
        .map(|(c, r)| {
            Record::Hh(HhPair {
                chosen: c.to_string(),
                rejected: r.to_string(),
            })
        })
        .collect();
    write_dataset(&path, &records).unwrap();
    let d = read(&path, None, false).unwrap();
    assert_eq!(d.format, Some(Format::HhRlhf));
    let c0 = d.records[0].comparisons().unwrap();
    assert_eq!(
        c0[0].prompt,
        "\n\nHuman: How do I open a lock?\n\nAssistant: Why do you ask?\n\nHuman: It's mine.\n\nAssistant:"
    );
    assert_eq!(c0[0].chosen, " Call a locksmith.");
    assert_eq!(c0[0].rejected, " Use a hairpin.");
    let c1 = d.records[1].comparisons().unwrap();
    assert_eq!(c1[0].prompt, "\n\nHuman: hi\n\nAssistant:");
    assert_eq!(c1[0].chosen, " Hello!\n\nHuman: bye\n\nAssistant: Bye.");

    // A pair with no shared assistant turn is an error at its line, or skipped and counted.
    let plain = dir.path().join("hh.jsonl");
    let text = format!(
        "{}\n{}\n",
        records[0].to_json_line(),
        r#"{"chosen":"\n\nHuman: a\n\nAssistant: b","rejected":"\n\nHuman: c\n\nAssistant: b"}"#
    );
    std::fs::write(&plain, text).unwrap();
    let err = read(&plain, None, false).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:2: ", plain.display())) && err.contains("share no"),
        "{err}"
    );
    let d = read(&plain, None, true).unwrap();
    assert_eq!((d.records.len(), d.skipped.len()), (1, 1));
}
