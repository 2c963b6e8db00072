//! Header parsing and validation.
//!
//! The JSON is read into [`Json`], a small value type that keeps object entries as a list in
//! file order. `serde_json::Value` would not do: its maps keep only the last of duplicate keys,
//! and a header that names a tensor twice must be an error, not a silent choice of one entry.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{checked_num_elements, Header, TensorInfo, METADATA_KEY};
use crate::{DType, Error, Result};

/// Largest header length accepted, in bytes (the reference implementation's limit). Real headers
/// are kilobytes to a few megabytes; a larger length field is corruption, and checking it first
/// avoids handing a huge slice to the JSON parser.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Parses and validates the header of a whole safetensors file held in `bytes`.
///
/// `path` is used only in error messages. See the module docs for everything that is checked.
/// On success every [`TensorInfo`] satisfies `data_start <= begin <= end <= bytes.len()` and
/// `end - begin == num_elements * dtype size`, and the tensors tile the data section exactly.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let err = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };

    let Some((len_field, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(err(format!(
            "file is {} bytes, shorter than the 8-byte header length field",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_field);
    if header_len > MAX_HEADER_LEN {
        return Err(err(format!(
            "header length field says {header_len} bytes, more than the limit of {MAX_HEADER_LEN} \
             (file is {} bytes)",
            bytes.len()
        )));
    }
    if header_len > rest.len() as u64 {
        return Err(err(format!(
            "header length field says {header_len} bytes but only {} bytes follow it \
             (file is {} bytes)",
            rest.len(),
            bytes.len()
        )));
    }
    // Fits: header_len <= rest.len().
    let header_len = header_len as usize;
    let (header_bytes, data) = rest.split_at(header_len);
    let data_start = 8 + header_len;

    let text = std::str::from_utf8(header_bytes).map_err(|e| {
        err(format!(
            "header is not valid UTF-8 (invalid byte at header offset {})",
            e.valid_up_to()
        ))
    })?;
    let json: Json =
        serde_json::from_str(text).map_err(|e| err(format!("header is not valid JSON: {e}")))?;
    let Json::Object(entries) = json else {
        return Err(err(format!(
            "header must be a JSON object, found {}",
            json.kind()
        )));
    };
    check_unique_keys(&entries, "header").map_err(&err)?;

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == METADATA_KEY {
            metadata = Some(parse_metadata(value).map_err(&err)?);
        } else {
            let entry = parse_tensor(&name, value, data.len()).map_err(&err)?;
            tensors.push((name, entry));
        }
    }

    // Tiling check: sorted by (begin, end), each tensor must start where the previous one ended
    // and the last must end at the end of the file. Stable sort keeps header order for ties.
    tensors.sort_by_key(|(_, t)| (t.begin, t.end));
    let mut covered = 0usize;
    let mut previous: Option<&str> = None;
    for (name, t) in &tensors {
        if t.begin < covered {
            let prev = previous.unwrap_or_default();
            return Err(err(format!(
                "tensor {name:?} with data_offsets [{}, {}] overlaps tensor {prev:?}, which ends \
                 at data offset {covered}",
                t.begin, t.end
            )));
        }
        if t.begin > covered {
            let after = match previous {
                Some(prev) => format!("the end of tensor {prev:?}"),
                None => "the start of the data section".to_string(),
            };
            return Err(err(format!(
                "gap of {} unused bytes at data offsets [{covered}, {}) between {after} and \
                 tensor {name:?}; tensors must cover the data section without gaps",
                t.begin - covered,
                t.begin
            )));
        }
        covered = t.end;
        previous = Some(name);
    }
    if covered != data.len() {
        // covered < data.len(): parse_tensor checked every end against data.len().
        return Err(err(format!(
            "{} unused bytes at the end of the file: tensors cover data offsets [0, {covered}) \
             of a {}-byte data section",
            data.len() - covered,
            data.len()
        )));
    }

    let tensors = tensors
        .into_iter()
        .map(|(name, t)| TensorInfo {
            name,
            dtype: t.dtype,
            shape: t.shape,
            begin: data_start + t.begin,
            end: data_start + t.end,
        })
        .collect();
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// A tensor entry with offsets still relative to the data section.
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn parse_metadata(value: Json) -> std::result::Result<BTreeMap<String, String>, String> {
    let Json::Object(entries) = value else {
        return Err(format!(
            "{METADATA_KEY:?} must be a JSON object of strings, found {}",
            value.kind()
        ));
    };
    check_unique_keys(&entries, METADATA_KEY)?;
    entries
        .into_iter()
        .map(|(k, v)| match v {
            Json::String(s) => Ok((k, s)),
            other => Err(format!(
                "{METADATA_KEY:?} value for key {k:?} must be a string, found {}",
                other.kind()
            )),
        })
        .collect()
}

fn parse_tensor(name: &str, value: Json, data_len: usize) -> std::result::Result<Entry, String> {
    let Json::Object(fields) = value else {
        return Err(format!(
            "tensor {name:?}: entry must be a JSON object, found {}",
            value.kind()
        ));
    };
    check_unique_keys(&fields, &format!("tensor {name:?}"))?;
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (key, v) in fields {
        match key.as_str() {
            "dtype" => dtype = Some(v),
            "shape" => shape = Some(v),
            "data_offsets" => offsets = Some(v),
            _ => {
                return Err(format!(
                    "tensor {name:?}: unexpected key {key:?} (expected dtype, shape, data_offsets)"
                ))
            }
        }
    }
    let missing = |key: &str| format!("tensor {name:?}: missing {key:?}");

    let dtype = match dtype.ok_or_else(|| missing("dtype"))? {
        Json::String(s) => DType::from_safetensors_name(&s).ok_or_else(|| {
            format!(
                "tensor {name:?}: unsupported dtype {s:?} (supported: F32, BF16, F16, I64, I32, \
                 U32, U8)"
            )
        })?,
        other => {
            return Err(format!(
                "tensor {name:?}: dtype must be a string, found {}",
                other.kind()
            ))
        }
    };

    let shape = index_list(name, "shape", shape.ok_or_else(|| missing("shape"))?)?;
    let num_elements = checked_num_elements(&shape).ok_or_else(|| {
        format!("tensor {name:?}: shape {shape:?} has more elements than fit in usize")
    })?;
    let num_bytes = num_elements
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| {
            format!(
                "tensor {name:?}: shape {shape:?} of {} is more bytes than fit in usize",
                dtype.safetensors_name()
            )
        })?;

    let offsets = index_list(
        name,
        "data_offsets",
        offsets.ok_or_else(|| missing("data_offsets"))?,
    )?;
    let &[begin, end] = offsets.as_slice() else {
        return Err(format!(
            "tensor {name:?}: data_offsets must be [begin, end], found {} entries",
            offsets.len()
        ));
    };
    if begin > end {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] have begin after end"
        ));
    }
    if end - begin != num_bytes {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of \
             {} needs {num_bytes}",
            end - begin,
            dtype.safetensors_name()
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] end past the {data_len}-byte data \
             section"
        ));
    }
    Ok(Entry {
        dtype,
        shape,
        begin,
        end,
    })
}

/// A JSON array of non-negative integers that fit in usize (a shape or data_offsets).
fn index_list(name: &str, what: &str, value: Json) -> std::result::Result<Vec<usize>, String> {
    let Json::Array(items) = value else {
        return Err(format!(
            "tensor {name:?}: {what} must be an array of non-negative integers, found {}",
            value.kind()
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Json::Number(Number::Unsigned(u)) => usize::try_from(*u)
                .map_err(|_| format!("tensor {name:?}: {what}[{i}] = {u} does not fit in usize")),
            other => Err(format!(
                "tensor {name:?}: {what}[{i}] must be a non-negative integer, found {}",
                other.describe()
            )),
        })
        .collect()
}

fn check_unique_keys(entries: &[(String, Json)], what: &str) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (key, _) in entries {
        if !seen.insert(key.as_str()) {
            return Err(format!("{what}: duplicate key {key:?}"));
        }
    }
    Ok(())
}

/// A JSON value whose objects keep every entry, duplicates included, in file order.
#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

#[derive(Debug, Clone, Copy)]
enum Number {
    Unsigned(u64),
    Negative(i64),
    /// Non-integers, and integers too large for u64 (serde_json parses those as f64).
    Float(f64),
}

impl Json {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }

    /// The kind, with the value for scalars (for messages about shape and offset entries).
    fn describe(&self) -> String {
        match self {
            Json::Number(Number::Negative(i)) => format!("{i}"),
            Json::Number(Number::Float(f)) => format!("{f}"),
            Json::Number(Number::Unsigned(u)) => format!("{u}"),
            Json::Bool(b) => format!("{b}"),
            Json::String(s) => format!("the string {s:?}"),
            other => other.kind().to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        // serde_json bounds the nesting depth (128) inside `deserialize_any`, so hostile input
        // like "[[[[..." is an error, not a stack overflow.
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> std::result::Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Json, E> {
        Ok(Json::Number(Number::Unsigned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Json, E> {
        Ok(Json::Number(match u64::try_from(v) {
            Ok(u) => Number::Unsigned(u),
            Err(_) => Number::Negative(v),
        }))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Json, E> {
        Ok(Json::Number(Number::Float(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}
