//! `rlhf inspect FILE.safetensors`: what a checkpoint holds — each tensor's name, dtype, shape and
//! byte size in file order, the totals, and the `__metadata__` — as a table or, with `--json`, as
//! one JSON object for scripts. The file is memory-mapped and its header fully validated (see
//! `rlhf_tensor::safetensors`); tensor data is not read.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use rlhf_tensor::safetensors::MappedFile;

pub fn run(file: &Path, json: bool) -> anyhow::Result<()> {
    let mapped =
        MappedFile::open(file).with_context(|| format!("cannot inspect {}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&render_json(&mapped))?);
    } else {
        print!("{}", render_text(&mapped));
    }
    Ok(())
}

/// The table: one line per tensor, then totals and metadata.
fn render_text(m: &MappedFile) -> String {
    let h = m.header();
    let rows: Vec<[String; 4]> = h
        .tensors
        .iter()
        .map(|t| {
            [
                printable(&t.name),
                t.dtype.safetensors_name().to_string(),
                format!("{:?}", t.shape),
                t.byte_len().to_string(),
            ]
        })
        .collect();
    let titles = ["name", "dtype", "shape", "bytes"];
    let mut widths = titles.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }

    let data_bytes: usize = h.tensors.iter().map(|t| t.byte_len()).sum();
    let elements: usize = h.tensors.iter().map(|t| t.num_elements()).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} bytes ({}), header {} bytes, data section starts at byte {}",
        m.path().display(),
        m.bytes().len(),
        human_bytes(m.bytes().len()),
        h.data_start - 8,
        h.data_start
    );
    let line = |out: &mut String, cells: [&str; 4]| {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    };
    line(&mut out, titles);
    for row in &rows {
        line(&mut out, [&row[0], &row[1], &row[2], &row[3]]);
    }
    let _ = writeln!(
        out,
        "total: {} tensors, {elements} elements, {data_bytes} bytes ({})",
        h.tensors.len(),
        human_bytes(data_bytes)
    );
    match &h.metadata {
        None => out.push_str("metadata: none\n"),
        Some(meta) => {
            let _ = writeln!(out, "metadata: {} entries", meta.len());
            for (k, v) in meta {
                let _ = writeln!(out, "  {}: {}", printable(k), printable(v));
            }
        }
    }
    out
}

/// Everything in the table, machine-readable. Offsets are relative to the data section, as in the
/// file's own header.
fn render_json(m: &MappedFile) -> serde_json::Value {
    let h = m.header();
    let tensors: Vec<serde_json::Value> = h
        .tensors
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "elements": t.num_elements(),
                "bytes": t.byte_len(),
                "data_offsets": [t.begin - h.data_start, t.end - h.data_start],
            })
        })
        .collect();
    serde_json::json!({
        "file": m.path().display().to_string(),
        "file_bytes": m.bytes().len(),
        "header_bytes": h.data_start - 8,
        "tensors": tensors,
        "total_tensors": h.tensors.len(),
        "total_elements": h.tensors.iter().map(|t| t.num_elements()).sum::<usize>(),
        "total_bytes": h.tensors.iter().map(|t| t.byte_len()).sum::<usize>(),
        "metadata": h.metadata,
    })
}

/// `s` as is, or quoted and escaped if it holds control characters (which would break the table
/// or the terminal).
fn printable(s: &str) -> String {
    if s.chars().any(char::is_control) {
        format!("{s:?}")
    } else {
        s.to_string()
    }
}

/// A byte count in binary units with 3 significant-ish digits: "712 B", "1.50 KiB", "474 MiB".
fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{v:.digits$} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_tensor::safetensors::{write, RawTensor};
    use rlhf_tensor::DType;
    use std::collections::BTreeMap;

    fn sample(dir: &Path) -> MappedFile {
        let path = dir.join("model.safetensors");
        let w = [0u8; 24];
        let ids = [0u8; 16];
        let tensors = [
            RawTensor {
                name: "wte.weight",
                dtype: DType::F32,
                shape: &[2, 3],
                data: &w,
            },
            RawTensor {
                name: "ids",
                dtype: DType::I64,
                shape: &[2],
                data: &ids,
            },
            RawTensor {
                name: "odd\nname",
                dtype: DType::U8,
                shape: &[0],
                data: &[],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write(&path, &tensors, Some(&meta)).unwrap();
        MappedFile::open(&path).unwrap()
    }

    #[test]
    fn text_lists_tensors_in_file_order_with_totals_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let text = render_text(&sample(dir.path()));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("model.safetensors"), "{text}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["name", "dtype", "shape", "bytes"]
        );
        // I64 before F32 (widest first), names escaped when they hold control characters.
        assert!(
            lines[2].starts_with("ids ") && lines[2].contains("I64") && lines[2].ends_with(" 16"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("wte.weight")
                && lines[3].contains("[2, 3]")
                && lines[3].ends_with(" 24"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("\"odd\\nname\"") && lines[4].ends_with(" 0"),
            "{text}"
        );
        assert_eq!(lines[5], "total: 3 tensors, 8 elements, 40 bytes (40 B)");
        assert_eq!(lines[6..], ["metadata: 1 entries", "  format: pt"]);
    }

    #[test]
    fn json_has_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample(dir.path());
        let v = render_json(&m);
        assert_eq!(v["total_bytes"], 40);
        assert_eq!(v["total_elements"], 8);
        assert_eq!(v["file_bytes"], m.bytes().len());
        assert_eq!(v["metadata"]["format"], "pt");
        let t = &v["tensors"][1];
        assert_eq!(t["name"], "wte.weight");
        assert_eq!(t["dtype"], "F32");
        assert_eq!(t["shape"], serde_json::json!([2, 3]));
        assert_eq!(t["data_offsets"], serde_json::json!([16, 40]));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.safetensors");
        std::fs::write(&path, b"\x02\0\0\0\0\0\0\0[]").unwrap();
        let err = format!("{:#}", run(&path, false).unwrap_err());
        assert!(
            err.contains("broken.safetensors") && err.contains("must be a JSON object"),
            "{err}"
        );
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(500 * 1024 * 1024), "500 MiB");
        assert_eq!(human_bytes(20 * 1024 * 1024 * 1024), "20.0 GiB");
    }
}
