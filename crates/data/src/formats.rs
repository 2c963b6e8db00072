//! JSON Lines datasets (`.jsonl`, `.jsonl.gz`) in the layouts the RLHF ecosystem uses.
//!
//! | format   | one line                                                   |
//! |----------|------------------------------------------------------------|
//! | demos    | `{"prompt": P, "completion": C}`                           |
//! | pairwise | `{"prompt": P, "chosen": A, "rejected": B}`                |
//! | hh-rlhf  | `{"chosen": DIALOGUE, "rejected": DIALOGUE}` (Anthropic)   |
//! | kwise    | `{"prompt": P, "responses": [R…], "ranking": [rank…]}`     |
//! | prompts  | `{"prompt": P}`                                            |
//!
//! A record's format is the set of these known keys it has; other keys (ids, metadata) are
//! allowed and ignored. A file's format is given or detected from its first record, and every
//! later record must have the same known keys. In K-wise records `ranking[i]` is the rank of
//! `responses[i]`, 1 = best, equal ranks are ties. HH-RLHF pairs are split into a prompt (the
//! dialogue up to and including the last "\n\nAssistant:" turn the two share) and two responses.
//!
//! A bad line is an error naming the file and line and what is wrong; with `skip_invalid` it is
//! skipped and recorded instead (see [`JsonlReader::skipped`]): nothing is dropped silently.
//! Full details in docs/data-formats.md.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{DataError, Result};

/// The dialogue turn HH-RLHF pairs are split at.
pub const ASSISTANT_TURN: &str = "\n\nAssistant:";

/// The keys that decide a record's format.
const KNOWN_KEYS: [&str; 6] = [
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "responses",
    "ranking",
];

/// A dataset layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Demos,
    Pairwise,
    HhRlhf,
    KWise,
    Prompts,
}

impl Format {
    /// All formats.
    pub const ALL: [Format; 5] = [
        Format::Demos,
        Format::Pairwise,
        Format::HhRlhf,
        Format::KWise,
        Format::Prompts,
    ];

    /// The format's name on the command line and in docs.
    pub fn name(self) -> &'static str {
        match self {
            Format::Demos => "demos",
            Format::Pairwise => "pairwise",
            Format::HhRlhf => "hh-rlhf",
            Format::KWise => "kwise",
            Format::Prompts => "prompts",
        }
    }

    /// The format with this name.
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The known keys a record of this format has, in the order they are written.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Format::Demos => &["prompt", "completion"],
            Format::Pairwise => &["prompt", "chosen", "rejected"],
            Format::HhRlhf => &["chosen", "rejected"],
            Format::KWise => &["prompt", "responses", "ranking"],
            Format::Prompts => &["prompt"],
        }
    }

    /// The format whose key set is exactly `keys` (known keys only, any order).
    fn from_keys(keys: &[&str]) -> Option<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.keys().len() == keys.len() && f.keys().iter().all(|k| keys.contains(k)))
    }
}

/// A demonstration: the completion a labeler would write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Demo {
    pub prompt: String,
    pub completion: String,
}

/// A pairwise comparison: `chosen` preferred to `rejected`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// An Anthropic HH-RLHF pair: two whole dialogues sharing a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HhPair {
    pub chosen: String,
    pub rejected: String,
}

/// A K-wise ranking: `ranking[i]` is the rank of `responses[i]` (1 = best, ties allowed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ranked {
    pub prompt: String,
    pub responses: Vec<String>,
    pub ranking: Vec<u32>,
}

/// A prompt for PPO or evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PromptRecord {
    pub prompt: String,
}

/// One line of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Demo(Demo),
    Comparison(Comparison),
    Hh(HhPair),
    Ranked(Ranked),
    Prompt(PromptRecord),
}

/// An HH-RLHF pair split at the last shared assistant turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HhSplit {
    /// The shared dialogue, ending with "\n\nAssistant:".
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// True when the two dialogues diverge before their own last assistant turn, so the
    /// responses hold more than one turn.
    pub diverged_early: bool,
}

/// Length in bytes of the longest common prefix.
fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl HhPair {
    /// Splits the pair into prompt and responses at the last "\n\nAssistant:" turn that both
    /// dialogues share. In most pairs that is the last turn of each; a few real pairs diverge
    /// earlier, and then the responses carry the rest of each dialogue (`diverged_early`).
    pub fn split(&self) -> std::result::Result<HhSplit, String> {
        let (c, r) = (self.chosen.as_bytes(), self.rejected.as_bytes());
        let common = common_prefix_len(c, r);
        let turn = ASSISTANT_TURN.as_bytes();
        let at = c[..common]
            .windows(turn.len())
            .rposition(|w| w == turn)
            .ok_or_else(|| {
                "chosen and rejected share no \"\\n\\nAssistant:\" turn to split the prompt at"
                    .to_string()
            })?;
        // The turn marker is ASCII, so `end` is a character boundary in both strings.
        let end = at + turn.len();
        let chosen = self.chosen[end..].to_string();
        let rejected = self.rejected[end..].to_string();
        let diverged_early = chosen.contains(ASSISTANT_TURN) || rejected.contains(ASSISTANT_TURN);
        Ok(HhSplit {
            prompt: self.chosen[..end].to_string(),
            chosen,
            rejected,
            diverged_early,
        })
    }
}

impl Ranked {
    /// The (better, worse) index pairs the ranking implies, all C(K,2) of them minus ties, and
    /// the number of tied pairs dropped.
    pub fn pairs(&self) -> (Vec<(usize, usize)>, usize) {
        let mut pairs = Vec::new();
        let mut ties = 0;
        for i in 0..self.ranking.len() {
            for j in i + 1..self.ranking.len() {
                match self.ranking[i].cmp(&self.ranking[j]) {
                    std::cmp::Ordering::Less => pairs.push((i, j)),
                    std::cmp::Ordering::Greater => pairs.push((j, i)),
                    std::cmp::Ordering::Equal => ties += 1,
                }
            }
        }
        (pairs, ties)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let k = self.responses.len();
        if k < 2 {
            return Err(format!("\"responses\" needs at least 2 entries, got {k}"));
        }
        if self.ranking.len() != k {
            return Err(format!(
                "\"ranking\" has {} entries but \"responses\" has {k}",
                self.ranking.len()
            ));
        }
        if let Some(&bad) = self.ranking.iter().find(|&&r| r < 1 || r as usize > k) {
            return Err(format!("rank {bad} outside 1..={k} in \"ranking\""));
        }
        Ok(())
    }
}

impl Record {
    /// The record's format.
    pub fn format(&self) -> Format {
        match self {
            Record::Demo(_) => Format::Demos,
            Record::Comparison(_) => Format::Pairwise,
            Record::Hh(_) => Format::HhRlhf,
            Record::Ranked(_) => Format::KWise,
            Record::Prompt(_) => Format::Prompts,
        }
    }

    /// The prompt, where the record has one (HH-RLHF: the split-off shared dialogue).
    pub fn prompt(&self) -> Option<String> {
        match self {
            Record::Demo(d) => Some(d.prompt.clone()),
            Record::Comparison(c) => Some(c.prompt.clone()),
            Record::Hh(h) => h.split().ok().map(|s| s.prompt),
            Record::Ranked(r) => Some(r.prompt.clone()),
            Record::Prompt(p) => Some(p.prompt.clone()),
        }
    }

    /// The pairwise comparisons the record holds (none for demos and prompts). K-wise rankings
    /// give all untied pairs; HH-RLHF pairs are split at their last shared assistant turn.
    pub fn comparisons(&self) -> Result<Vec<Comparison>> {
        Ok(match self {
            Record::Comparison(c) => vec![c.clone()],
            Record::Hh(h) => {
                let s = h.split().map_err(|msg| DataError::Record {
                    what: "hh-rlhf pair",
                    msg,
                })?;
                vec![Comparison {
                    prompt: s.prompt,
                    chosen: s.chosen,
                    rejected: s.rejected,
                }]
            }
            Record::Ranked(r) => r
                .pairs()
                .0
                .into_iter()
                .map(|(w, l)| Comparison {
                    prompt: r.prompt.clone(),
                    chosen: r.responses[w].clone(),
                    rejected: r.responses[l].clone(),
                })
                .collect(),
            Record::Demo(_) | Record::Prompt(_) => Vec::new(),
        })
    }

    /// The record as one line of JSON (no newline).
    pub fn to_json_line(&self) -> String {
        let v = match self {
            Record::Demo(x) => serde_json::to_string(x),
            Record::Comparison(x) => serde_json::to_string(x),
            Record::Hh(x) => serde_json::to_string(x),
            Record::Ranked(x) => serde_json::to_string(x),
            Record::Prompt(x) => serde_json::to_string(x),
        };
        // Serialising plain strings and integers cannot fail.
        v.expect("records serialise")
    }

    /// Parses one line, detecting the format unless `expected` is given. The error says what
    /// is wrong (the caller adds file and line).
    pub fn parse_line(line: &str, expected: Option<Format>) -> std::result::Result<Record, String> {
        if line.trim().is_empty() {
            return Err("empty line (expected a JSON object)".to_string());
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            let msg = e.to_string();
            // serde_json says "at line 1 column N" about the one-line string; keep the column.
            let msg = msg
                .rsplit_once(" at line ")
                .map_or(msg.as_str(), |(m, _)| m)
                .to_string();
            format!("invalid JSON at column {}: {msg}", e.column())
        })?;
        let Value::Object(obj) = value else {
            return Err(format!("expected a JSON object, got {}", kind_of(&value)));
        };
        let keys: Vec<&str> = KNOWN_KEYS
            .iter()
            .copied()
            .filter(|k| obj.contains_key(*k))
            .collect();
        let format = match (Format::from_keys(&keys), expected) {
            (Some(f), None) => f,
            (Some(f), Some(e)) if f == e => f,
            (found, Some(e)) => {
                return Err(format!(
                    "fields {keys:?} do not match format {} (expects {:?}){}",
                    e.name(),
                    e.keys(),
                    found.map_or(String::new(), |f| format!(
                        "; they are a {} record",
                        f.name()
                    ))
                ))
            }
            (None, None) => {
                return Err(format!(
                    "fields {keys:?} match no known format (demos {:?}, pairwise {:?}, \
                     hh-rlhf {:?}, kwise {:?}, prompts {:?})",
                    Format::Demos.keys(),
                    Format::Pairwise.keys(),
                    Format::HhRlhf.keys(),
                    Format::KWise.keys(),
                    Format::Prompts.keys()
                ))
            }
        };
        let record = match format {
            Format::Demos => Record::Demo(Demo {
                prompt: string_field(&obj, "prompt")?,
                completion: string_field(&obj, "completion")?,
            }),
            Format::Pairwise => Record::Comparison(Comparison {
                prompt: string_field(&obj, "prompt")?,
                chosen: string_field(&obj, "chosen")?,
                rejected: string_field(&obj, "rejected")?,
            }),
            Format::HhRlhf => {
                let h = HhPair {
                    chosen: string_field(&obj, "chosen")?,
                    rejected: string_field(&obj, "rejected")?,
                };
                h.split()?;
                Record::Hh(h)
            }
            Format::KWise => {
                let r = Ranked {
                    prompt: string_field(&obj, "prompt")?,
                    responses: string_array(&obj, "responses")?,
                    ranking: rank_array(&obj, "ranking")?,
                };
                r.validate()?;
                Record::Ranked(r)
            }
            Format::Prompts => Record::Prompt(PromptRecord {
                prompt: string_field(&obj, "prompt")?,
            }),
        };
        Ok(record)
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!(
            "field {key:?} must be a string, got {}",
            kind_of(v)
        )),
        None => Err(format!("missing field {key:?}")),
    }
}

fn string_array(obj: &Map<String, Value>, key: &str) -> std::result::Result<Vec<String>, String> {
    let Some(Value::Array(items)) = obj.get(key) else {
        return Err(format!("field {key:?} must be an array of strings"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            v => Err(format!("{key}[{i}] must be a string, got {}", kind_of(v))),
        })
        .collect()
}

fn rank_array(obj: &Map<String, Value>, key: &str) -> std::result::Result<Vec<u32>, String> {
    let Some(Value::Array(items)) = obj.get(key) else {
        return Err(format!("field {key:?} must be an array of ranks"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| format!("{key}[{i}] must be a positive integer rank, got {v}"))
        })
        .collect()
}

/// Whether a path names a gzip file (by extension).
fn is_gz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Opens a file for reading, decompressing `.gz` files on the fly.
pub(crate) fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    Ok(if is_gz(path) {
        // MultiGzDecoder: gzip files may hold several concatenated members.
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// How to read a dataset.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOptions {
    /// The expected format; `None` detects it from the first valid record.
    pub format: Option<Format>,
    /// Skip (and record) bad lines instead of failing at the first.
    pub skip_invalid: bool,
}

/// A line that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedLine {
    pub line: u64,
    pub reason: String,
}

/// Streams the records of a JSON Lines file, one line at a time.
pub struct JsonlReader {
    source_name: String,
    reader: Box<dyn BufRead>,
    line: u64,
    format: Option<Format>,
    skip_invalid: bool,
    skipped: Vec<SkippedLine>,
    buf: Vec<u8>,
    done: bool,
}

impl JsonlReader {
    /// Opens `path` (`.gz` decompressed by extension).
    pub fn open(path: impl AsRef<Path>, options: ReadOptions) -> Result<Self> {
        let path = path.as_ref();
        let inner = open_maybe_gz(path)?;
        Ok(Self::from_reader(
            path.display().to_string(),
            BufReader::with_capacity(1 << 16, inner),
            options,
        ))
    }

    /// Reads from any buffered reader; `source_name` is what errors call it.
    pub fn from_reader(
        source_name: impl Into<String>,
        reader: impl BufRead + 'static,
        options: ReadOptions,
    ) -> Self {
        Self {
            source_name: source_name.into(),
            reader: Box::new(reader),
            line: 0,
            format: options.format,
            skip_invalid: options.skip_invalid,
            skipped: Vec::new(),
            buf: Vec::new(),
            done: false,
        }
    }

    /// The format: given, or detected from the first valid record (`None` before that).
    pub fn format(&self) -> Option<Format> {
        self.format
    }

    /// The lines skipped so far (only with `skip_invalid`).
    pub fn skipped(&self) -> &[SkippedLine] {
        &self.skipped
    }

    /// Number of lines read so far.
    pub fn lines_read(&self) -> u64 {
        self.line
    }

    fn line_error(&self, msg: String) -> DataError {
        DataError::Line {
            source_name: self.source_name.clone(),
            line: self.line,
            msg,
        }
    }

    /// The next line's record or the reason it is bad; `None` at the end of the input.
    fn next_line(&mut self) -> Option<Result<std::result::Result<Record, String>>> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                return Some(Err(DataError::Line {
                    source_name: self.source_name.clone(),
                    line: self.line + 1,
                    msg: format!("read failed: {e}"),
                }))
            }
        }
        self.line += 1;
        let mut bytes = self.buf.as_slice();
        if let Some(b) = bytes.strip_suffix(b"\n") {
            bytes = b.strip_suffix(b"\r").unwrap_or(b);
        }
        let parsed = match std::str::from_utf8(bytes) {
            Ok(text) => Record::parse_line(text, self.format),
            Err(e) => Err(format!(
                "invalid UTF-8 at byte {} of the line",
                e.valid_up_to()
            )),
        };
        Some(Ok(parsed))
    }
}

impl Iterator for JsonlReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            match self.next_line()? {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(Ok(record)) => {
                    self.format.get_or_insert(record.format());
                    return Some(Ok(record));
                }
                Ok(Err(msg)) if self.skip_invalid => self.skipped.push(SkippedLine {
                    line: self.line,
                    reason: msg,
                }),
                Ok(Err(msg)) => {
                    self.done = true;
                    return Some(Err(self.line_error(msg)));
                }
            }
        }
    }
}

/// A whole dataset in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// `None` only for a file with no valid record.
    pub format: Option<Format>,
    pub records: Vec<Record>,
    pub skipped: Vec<SkippedLine>,
}

/// Reads a whole dataset (fine for the sizes RLHF datasets have; use [`JsonlReader`] to stream).
pub fn read_dataset(path: impl AsRef<Path>, options: ReadOptions) -> Result<Dataset> {
    let mut reader = JsonlReader::open(path, options)?;
    let records = reader.by_ref().collect::<Result<Vec<_>>>()?;
    Ok(Dataset {
        format: reader.format(),
        records,
        skipped: reader.skipped().to_vec(),
    })
}

enum Sink {
    Plain(BufWriter<File>),
    Gz(flate2::write::GzEncoder<BufWriter<File>>),
}

/// Writes records one per line; `.gz` paths are gzip-compressed. All records of a file must have
/// one format. Call [`JsonlWriter::finish`] to flush (and end the gzip stream).
pub struct JsonlWriter {
    path: PathBuf,
    sink: Sink,
    format: Option<Format>,
    written: u64,
}

impl JsonlWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        let out = BufWriter::with_capacity(1 << 16, file);
        let sink = if is_gz(&path) {
            // The default header has no file name and mtime 0, so output is reproducible.
            Sink::Gz(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            ))
        } else {
            Sink::Plain(out)
        };
        Ok(Self {
            path,
            sink,
            format: None,
            written: 0,
        })
    }

    fn out(&mut self) -> &mut dyn Write {
        match &mut self.sink {
            Sink::Plain(w) => w,
            Sink::Gz(w) => w,
        }
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Record) -> Result<()> {
        // Refuse to write what the reader would reject, so a written file always reads back.
        let invalid = match record {
            Record::Ranked(r) => r.validate().err(),
            Record::Hh(h) => h.split().err(),
            _ => None,
        };
        if let Some(msg) = invalid {
            return Err(DataError::invalid(
                "JsonlWriter::write",
                format!(
                    "{}: record {}: {msg}",
                    self.path.display(),
                    self.written + 1
                ),
            ));
        }
        match self.format {
            None => self.format = Some(record.format()),
            Some(f) if f != record.format() => {
                return Err(DataError::invalid(
                    "JsonlWriter::write",
                    format!(
                        "{}: a {} record in a {} file",
                        self.path.display(),
                        record.format().name(),
                        f.name()
                    ),
                ))
            }
            Some(_) => {}
        }
        let mut line = record.to_json_line();
        line.push('\n');
        let path = self.path.clone();
        self.out()
            .write_all(line.as_bytes())
            .map_err(|e| DataError::io(path, e))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes everything to disk; returns the number of records written.
    pub fn finish(self) -> Result<u64> {
        let path = self.path;
        let io = |e| DataError::io(&path, e);
        let mut file = match self.sink {
            Sink::Plain(w) => w,
            Sink::Gz(w) => w.finish().map_err(io)?,
        };
        file.flush().map_err(io)?;
        Ok(self.written)
    }
}

/// Writes `records` to `path` (all of one format).
pub fn write_dataset(path: impl AsRef<Path>, records: &[Record]) -> Result<u64> {
    let mut w = JsonlWriter::create(path)?;
    for r in records {
        w.write(r)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hh(chosen: &str, rejected: &str) -> HhPair {
        HhPair {
            chosen: chosen.into(),
            rejected: rejected.into(),
        }
    }

    #[test]
    fn hh_split_at_last_shared_assistant_turn() {
        let p = hh(
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: I won't help.",
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: Use a pin.",
        );
        let s = p.split().unwrap();
        assert_eq!(
            s.prompt,
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant:"
        );
        assert_eq!(s.chosen, " I won't help.");
        assert_eq!(s.rejected, " Use a pin.");
        assert!(!s.diverged_early);
        assert_eq!(format!("{}{}", s.prompt, s.chosen), p.chosen);
    }

    #[test]
    fn hh_split_when_responses_share_their_start() {
        // The common prefix runs into the responses (" I "), but the split stays at the turn.
        let p = hh(
            "\n\nHuman: q\n\nAssistant: I think not.",
            "\n\nHuman: q\n\nAssistant: I think so.",
        );
        let s = p.split().unwrap();
        assert_eq!(s.prompt, "\n\nHuman: q\n\nAssistant:");
        assert_eq!(
            (s.chosen.as_str(), s.rejected.as_str()),
            (" I think not.", " I think so.")
        );
    }

    #[test]
    fn hh_split_when_dialogues_diverge_earlier() {
        let p = hh(
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d",
        );
        let s = p.split().unwrap();
        assert_eq!(s.prompt, "\n\nHuman: a\n\nAssistant:");
        assert_eq!(s.chosen, " b\n\nHuman: c\n\nAssistant: d");
        assert_eq!(s.rejected, " x\n\nHuman: c\n\nAssistant: d");
        assert!(s.diverged_early);
        // Multi-byte characters right after the common prefix do not break the split.
        let p = hh(
            "\n\nHuman: é\n\nAssistant: ü",
            "\n\nHuman: é\n\nAssistant: ö",
        );
        assert_eq!(p.split().unwrap().chosen, " ü");
        // Nothing shared: an error, never a guess.
        assert!(hh(
            "\n\nHuman: a\n\nAssistant: b",
            "\n\nHuman: z\n\nAssistant: b"
        )
        .split()
        .is_err());
        assert!(hh("no turns", "no turns").split().is_err());
    }

    #[test]
    fn writer_refuses_records_the_reader_would_reject() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JsonlWriter::create(dir.path().join("x.jsonl")).unwrap();
        let bad = Record::Ranked(Ranked {
            prompt: "p".into(),
            responses: vec!["a".into(), "b".into()],
            ranking: vec![1],
        });
        assert!(w.write(&bad).is_err());
        assert!(w.write(&Record::Hh(hh("a", "b"))).is_err());
        w.write(&Record::Prompt(PromptRecord { prompt: "p".into() }))
            .unwrap();
        let demo = Record::Demo(Demo {
            prompt: "p".into(),
            completion: "c".into(),
        });
        assert!(w.write(&demo).is_err(), "mixed formats");
        assert_eq!(w.finish().unwrap(), 1);
    }

    #[test]
    fn kwise_pairs_drop_ties() {
        let r = Ranked {
            prompt: "p".into(),
            responses: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            ranking: vec![2, 1, 2, 4],
        };
        let (pairs, ties) = r.pairs();
        assert_eq!(ties, 1);
        assert_eq!(pairs, vec![(1, 0), (0, 3), (1, 2), (1, 3), (2, 3)]);
    }

    #[test]
    fn detection_and_errors() {
        let f = |l: &str| Record::parse_line(l, None).map(|r| r.format());
        assert_eq!(f(r#"{"prompt":"a","completion":"b"}"#), Ok(Format::Demos));
        assert_eq!(
            f(r#"{"prompt":"a","chosen":"b","rejected":"c","id":3}"#),
            Ok(Format::Pairwise)
        );
        assert_eq!(
            f(
                r#"{"chosen":"\n\nHuman: a\n\nAssistant: b","rejected":"\n\nHuman: a\n\nAssistant: c"}"#
            ),
            Ok(Format::HhRlhf)
        );
        assert_eq!(
            f(r#"{"prompt":"a","responses":["x","y"],"ranking":[1,1]}"#),
            Ok(Format::KWise)
        );
        assert_eq!(f(r#"{"prompt":"a"}"#), Ok(Format::Prompts));
        for (line, want) in [
            (r#"{"prompt":"a","completion":3}"#, "must be a string"),
            (
                r#"{"prompt":"a","responses":["x"],"ranking":[1]}"#,
                "at least 2",
            ),
            (
                r#"{"prompt":"a","responses":["x","y"],"ranking":[1]}"#,
                "has 1 entries",
            ),
            (
                r#"{"prompt":"a","responses":["x","y"],"ranking":[0,1]}"#,
                "outside 1..=2",
            ),
            (
                r#"{"prompt":"a","responses":["x","y"],"ranking":[1,-1]}"#,
                "positive integer",
            ),
            (r#"{"text":"a"}"#, "match no known format"),
            (r#"[1,2]"#, "got an array"),
            (r#"{"prompt":"a""#, "invalid JSON at column"),
            ("", "empty line"),
        ] {
            let e = f(line).unwrap_err();
            assert!(e.contains(want), "{line:?}: {e}");
        }
        let e = Record::parse_line(r#"{"prompt":"a"}"#, Some(Format::Demos)).unwrap_err();
        assert!(
            e.contains("do not match format demos") && e.contains("prompts record"),
            "{e}"
        );
    }

    #[test]
    fn reader_reports_file_and_line_or_skips_and_counts() {
        let text = "{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\r\n{\"prompt\":3}\n{\"prompt\":\"d\"}";
        let read = |skip| {
            JsonlReader::from_reader(
                "mem.jsonl",
                std::io::Cursor::new(text.as_bytes().to_vec()),
                ReadOptions {
                    format: None,
                    skip_invalid: skip,
                },
            )
        };
        let err = read(false).collect::<Result<Vec<_>>>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "mem.jsonl:3: field \"prompt\" must be a string, got a number"
        );
        let mut r = read(true);
        let recs: Vec<Record> = r.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(r.skipped().len(), 1);
        assert_eq!(r.skipped()[0].line, 3);
        assert_eq!(r.format(), Some(Format::Prompts));

        let bad_utf8 = b"{\"prompt\":\"a\"}\n{\"prompt\":\"\xff\"}\n".to_vec();
        let err = JsonlReader::from_reader(
            "u.jsonl",
            std::io::Cursor::new(bad_utf8),
            ReadOptions::default(),
        )
        .collect::<Result<Vec<_>>>()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "u.jsonl:2: invalid UTF-8 at byte 11 of the line"
        );
    }
}
