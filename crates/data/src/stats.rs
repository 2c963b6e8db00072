//! Validation and summaries of dataset and text files (`rlhf data stats`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use crate::corpus::{text_stats, TextChunks, TextStats, DEFAULT_CHUNK_BYTES};
use crate::error::Result;
use crate::formats::{Format, JsonlReader, ReadOptions, Record, SkippedLine};
use crate::world::World;

/// Whether a path names a JSON Lines dataset (`.jsonl`, `.jsonl.gz`) rather than plain text.
pub fn is_jsonl_path(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")
}

/// Minimum, mean and maximum of a set of lengths (in bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lengths {
    pub count: u64,
    pub min: u64,
    pub max: u64,
    pub sum: u64,
}

impl Lengths {
    fn add(&mut self, len: usize) {
        let len = len as u64;
        if self.count == 0 {
            self.min = len;
            self.max = len;
        } else {
            self.min = self.min.min(len);
            self.max = self.max.max(len);
        }
        self.count += 1;
        self.sum += len;
    }

    /// Mean length (NaN when empty).
    pub fn mean(&self) -> f64 {
        self.sum as f64 / self.count as f64
    }
}

impl fmt::Display for Lengths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return write!(f, "none");
        }
        write!(
            f,
            "min {} mean {:.1} max {} (n={})",
            self.min,
            self.mean(),
            self.max,
            self.count
        )
    }
}

/// Summary of a JSON Lines dataset.
#[derive(Clone, Debug, Default)]
pub struct DatasetStats {
    pub source: String,
    pub format: Option<Format>,
    pub records: u64,
    pub skipped: Vec<SkippedLine>,
    pub unique_prompts: u64,
    /// Named fields' byte lengths, in a fixed order ("prompt", "completion", ...).
    pub lengths: BTreeMap<&'static str, Lengths>,
    /// Number of responses per K-wise record: K -> records.
    pub k_counts: BTreeMap<usize, u64>,
    /// Preference pairs the file yields (K-wise: untied pairs; pairwise and HH: one each).
    pub pairs: u64,
    /// Tied pairs dropped from K-wise rankings.
    pub ties_dropped: u64,
    /// Pairwise / HH records whose two responses are identical.
    pub identical_pairs: u64,
    /// HH-RLHF pairs that diverge before their own last assistant turn.
    pub diverged_early: u64,
    /// Records per built-in world family, recognised from the prompt text.
    pub families: BTreeMap<&'static str, u64>,
    /// Records whose prompt is not a built-in world question.
    pub unrecognised_prompts: u64,
}

/// Reads and validates a whole dataset, summarising it as it streams.
pub fn dataset_stats(path: impl AsRef<Path>, options: ReadOptions) -> Result<DatasetStats> {
    let path = path.as_ref();
    let mut reader = JsonlReader::open(path, options)?;
    let mut st = DatasetStats {
        source: path.display().to_string(),
        ..Default::default()
    };
    // Families are a property of the text; any world seed recognises them.
    let world = World::new(0);
    let mut prompts = HashSet::new();
    let len = |st: &mut DatasetStats, key: &'static str, n: usize| {
        st.lengths.entry(key).or_default().add(n);
    };
    for record in reader.by_ref() {
        let record = record?;
        st.records += 1;
        match &record {
            Record::Demo(d) => len(&mut st, "completion", d.completion.len()),
            Record::Comparison(c) => {
                len(&mut st, "chosen", c.chosen.len());
                len(&mut st, "rejected", c.rejected.len());
                st.pairs += 1;
                st.identical_pairs += u64::from(c.chosen == c.rejected);
            }
            Record::Hh(h) => {
                // Validated when read, so the split succeeds.
                let s = h.split().map_err(|msg| crate::DataError::Record {
                    what: "hh-rlhf pair",
                    msg,
                })?;
                len(&mut st, "chosen", s.chosen.len());
                len(&mut st, "rejected", s.rejected.len());
                st.pairs += 1;
                st.identical_pairs += u64::from(s.chosen == s.rejected);
                st.diverged_early += u64::from(s.diverged_early);
            }
            Record::Ranked(r) => {
                for resp in &r.responses {
                    len(&mut st, "response", resp.len());
                }
                *st.k_counts.entry(r.responses.len()).or_default() += 1;
                let (pairs, ties) = r.pairs();
                st.pairs += pairs.len() as u64;
                st.ties_dropped += ties as u64;
            }
            Record::Prompt(_) => {}
        }
        if let Some(prompt) = record.prompt() {
            len(&mut st, "prompt", prompt.len());
            match world.parse(&prompt) {
                Some(p) => *st.families.entry(p.family.name()).or_default() += 1,
                None => st.unrecognised_prompts += 1,
            }
            prompts.insert(prompt);
        }
    }
    st.format = reader.format();
    st.skipped = reader.skipped().to_vec();
    st.unique_prompts = prompts.len() as u64;
    Ok(st)
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file:             {}", self.source)?;
        writeln!(
            f,
            "format:           {}",
            self.format
                .map_or("unknown (no valid record)", |x| x.name())
        )?;
        writeln!(f, "records:          {}", self.records)?;
        writeln!(f, "skipped invalid:  {}", self.skipped.len())?;
        for s in self.skipped.iter().take(5) {
            writeln!(f, "  line {}: {}", s.line, s.reason)?;
        }
        if self.skipped.len() > 5 {
            writeln!(f, "  ... and {} more", self.skipped.len() - 5)?;
        }
        writeln!(f, "unique prompts:   {}", self.unique_prompts)?;
        for key in ["prompt", "completion", "chosen", "rejected", "response"] {
            if let Some(l) = self.lengths.get(key) {
                writeln!(f, "{:<18}{l}", format!("{key} bytes:"))?;
            }
        }
        if !self.k_counts.is_empty() {
            let ks: Vec<String> = self
                .k_counts
                .iter()
                .map(|(k, n)| format!("K={k}: {n}"))
                .collect();
            writeln!(f, "responses/rank:   {}", ks.join(", "))?;
        }
        if matches!(
            self.format,
            Some(Format::Pairwise | Format::HhRlhf | Format::KWise)
        ) {
            writeln!(f, "pairs:            {}", self.pairs)?;
            if self.format == Some(Format::KWise) {
                writeln!(f, "ties dropped:     {}", self.ties_dropped)?;
            } else {
                writeln!(f, "identical pairs:  {}", self.identical_pairs)?;
            }
        }
        if self.format == Some(Format::HhRlhf) {
            writeln!(
                f,
                "diverge before the last assistant turn: {}",
                self.diverged_early
            )?;
        }
        if self.families.is_empty() {
            write!(f, "families:         none recognised")?;
        } else {
            writeln!(f, "families:")?;
            for (name, n) in &self.families {
                writeln!(f, "  {name:<18}{n}")?;
            }
            write!(
                f,
                "  {:<18}{}",
                "(not recognised)", self.unrecognised_prompts
            )?;
        }
        Ok(())
    }
}

/// Summary of a plain text file.
#[derive(Clone, Debug)]
pub struct TextFileStats {
    pub source: String,
    pub text: TextStats,
}

/// Streams a text file (`.gz` by extension) and summarises it.
pub fn text_file_stats(path: impl AsRef<Path>) -> Result<TextFileStats> {
    let path = path.as_ref();
    let text = text_stats(TextChunks::open(path, DEFAULT_CHUNK_BYTES)?)?;
    Ok(TextFileStats {
        source: path.display().to_string(),
        text,
    })
}

impl fmt::Display for TextFileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.text;
        writeln!(f, "file:              {}", self.source)?;
        writeln!(f, "format:            plain UTF-8 text")?;
        writeln!(f, "bytes:             {}", t.bytes)?;
        writeln!(f, "characters:        {}", t.chars)?;
        writeln!(f, "lines:             {}", t.lines)?;
        writeln!(
            f,
            "documents:         {} (blank-line separated)",
            t.documents
        )?;
        write!(
            f,
            "instruction lines: {} ({:.2}% of documents)",
            t.instruction_lines,
            100.0 * t.instruction_lines as f64 / (t.documents.max(1)) as f64
        )
    }
}
