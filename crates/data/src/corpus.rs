//! Pretraining text: a generator of prose in the world's small language, and a streaming reader
//! for plain UTF-8 files of any size.
//!
//! The generated corpus describes words, numbers and operations ("lemon backwards is nomel.",
//! "23 plus 58 is 81.") and tells short stories ("the red fox runs. Then Anna finds a big box.").
//! Only 2% of its documents use the instruction format, and those only with training questions,
//! so a model pretrained on it continues text but does not follow instructions; the facts the
//! held-out families need (word lengths, subtraction, small letters) appear as prose only, as
//! the InstructGPT paper's held-out code and non-English prompts relied on pretraining knowledge.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{DataError, Result};
use crate::formats::open_maybe_gz;
use crate::rng::Rng;
use crate::world::{
    family, format_completion, format_prompt, vocab, Split, World, INSTRUCTION_PREFIX,
};

/// Fraction of documents that are an instruction-format example (training questions only).
pub const INSTRUCTION_DOCUMENT_RATE: f64 = 0.02;

/// Documents are separated by one blank line.
pub const DOCUMENT_SEPARATOR: &str = "\n\n";

fn task_word(rng: &mut Rng) -> &'static str {
    let n = vocab::NOUNS.len() + vocab::ADJECTIVES.len();
    let i = rng.index(n);
    if i < vocab::NOUNS.len() {
        vocab::NOUNS[i]
    } else {
        vocab::ADJECTIVES[i - vocab::NOUNS.len()]
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// One sentence stating a fact of the world.
fn fact(rng: &mut Rng) -> String {
    let w = task_word(rng);
    match rng.below(12) {
        0 => format!("{w} backwards is {}.", w.chars().rev().collect::<String>()),
        1 => format!("In capitals, {w} is {}.", w.to_ascii_uppercase()),
        2 => format!("{} in small letters is {w}.", w.to_ascii_uppercase()),
        3 => format!("The word {w} has {} letters.", w.len()),
        4 => {
            let c = char::from(*rng.choose(w.as_bytes()));
            match w.matches(c).count() {
                1 => format!("The letter {c} is in {w} once."),
                k => format!("The letter {c} is in {w} {k} times."),
            }
        }
        5 => {
            let (a, b) = (rng.below(100), rng.below(100));
            format!("{a} plus {b} is {}.", a + b)
        }
        6 => {
            let a = rng.below(100);
            let b = rng.range(0, a);
            format!("{a} minus {b} is {}.", a - b)
        }
        7 => {
            let len = rng.range(4, 6) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| b'0' + rng.below(10) as u8).collect();
            let shown = String::from_utf8(d.clone()).expect("ascii digits");
            d.sort_unstable();
            let sorted = String::from_utf8(d).expect("ascii digits");
            format!("In order, the digits {shown} are {sorted}.")
        }
        8 => {
            let n = rng.range(2, 4) as usize;
            format!("{w} said {n} times is {}.", vec![w; n].join(" "))
        }
        9 => {
            let s = family::sentence(rng);
            let first = s.split(' ').next().unwrap_or_default();
            format!("In \"{s}\" the first word is {first}.")
        }
        10 => {
            let s = family::sentence(rng);
            let last = s.split(' ').next_back().unwrap_or_default();
            format!("In \"{s}\" the last word is {last}.")
        }
        _ => {
            let name = rng.choose(vocab::NAMES);
            format!("When {name} was asked to help hurt someone, {name} said no.")
        }
    }
}

/// One sentence of a short story.
fn story_sentence(rng: &mut Rng) -> String {
    let s = capitalise(&family::sentence(rng));
    match rng.below(4) {
        0 => format!("Then {}.", family::sentence(rng)),
        1 => format!("One day {}.", family::sentence(rng)),
        _ => format!("{s}."),
    }
}

/// Generates pretraining documents for a world.
#[derive(Clone, Debug)]
pub struct CorpusGenerator {
    world: World,
}

impl CorpusGenerator {
    /// A generator whose rare instruction examples come from `world`'s training split.
    pub fn new(world: World) -> Self {
        Self { world }
    }

    /// One document: a paragraph of facts and story sentences, or (rarely) one instruction
    /// example in the fixed format.
    pub fn document(&self, rng: &mut Rng) -> String {
        if rng.chance(INSTRUCTION_DOCUMENT_RATE) {
            let p = self.world.sample_prompt(Split::Train, rng);
            let text = format_prompt(&p.text) + &format_completion(&p.reference);
            return text.trim_end().to_string();
        }
        let n = rng.range(2, 5);
        let story = rng.chance(0.4);
        let mut sentences = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let s = if story && rng.chance(0.8) {
                story_sentence(rng)
            } else {
                capitalise(&fact(rng))
            };
            sentences.push(s);
        }
        sentences.join(" ")
    }

    /// Writes `n` documents separated by blank lines to `out`; returns the bytes written.
    pub fn write_documents(
        &self,
        n: usize,
        rng: &mut Rng,
        out: &mut dyn Write,
    ) -> std::io::Result<u64> {
        let mut bytes = 0u64;
        for i in 0..n {
            let mut d = self.document(rng);
            d.push_str(if i + 1 == n { "\n" } else { DOCUMENT_SEPARATOR });
            out.write_all(d.as_bytes())?;
            bytes += d.len() as u64;
        }
        Ok(bytes)
    }
}

/// Default chunk size of [`TextChunks`]: 1 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Streams a UTF-8 text source as `String` chunks of about `chunk_bytes` bytes, never holding
/// the whole file. A multi-byte character split across two reads is carried over to the next
/// chunk, so every chunk is valid UTF-8 and their concatenation is exactly the input. Invalid
/// UTF-8 is an error naming the source and the byte offset.
pub struct TextChunks<R: Read> {
    source_name: String,
    reader: R,
    chunk_bytes: usize,
    /// Bytes of an incomplete character at the end of the previous read.
    carry: Vec<u8>,
    /// Offset in the input of the first byte of `carry`.
    offset: u64,
    done: bool,
}

impl TextChunks<Box<dyn Read>> {
    /// Opens a text file (`.gz` decompressed by extension) for streaming.
    pub fn open(path: impl AsRef<Path>, chunk_bytes: usize) -> Result<Self> {
        let path = path.as_ref();
        let reader = open_maybe_gz(path)?;
        TextChunks::new(path.display().to_string(), reader, chunk_bytes)
    }
}

impl<R: Read> TextChunks<R> {
    /// Streams `reader`; `source_name` is what errors call it.
    pub fn new(source_name: impl Into<String>, reader: R, chunk_bytes: usize) -> Result<Self> {
        if chunk_bytes == 0 {
            return Err(DataError::invalid(
                "TextChunks::new",
                "chunk_bytes must be > 0",
            ));
        }
        Ok(Self {
            source_name: source_name.into(),
            reader,
            chunk_bytes,
            carry: Vec::new(),
            offset: 0,
            done: false,
        })
    }

    /// Reads until `buf` holds `want` more bytes or the input ends; returns whether it ended.
    fn fill(&mut self, buf: &mut Vec<u8>, want: usize) -> Result<bool> {
        let start = buf.len();
        buf.resize(start + want, 0);
        let mut got = 0;
        while got < want {
            match self.reader.read(&mut buf[start + got..]) {
                Ok(0) => {
                    buf.truncate(start + got);
                    return Ok(true);
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(DataError::io(self.source_name.clone(), e));
                }
            }
        }
        Ok(false)
    }
}

impl<R: Read> Iterator for TextChunks<R> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let mut buf = std::mem::take(&mut self.carry);
            let ended = match self.fill(&mut buf, self.chunk_bytes) {
                Ok(e) => e,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let valid = match std::str::from_utf8(&buf) {
                Ok(_) => buf.len(),
                // An incomplete character at the very end: keep it for the next read.
                Err(e) if e.error_len().is_none() && !ended => e.valid_up_to(),
                Err(e) => {
                    self.done = true;
                    return Some(Err(DataError::Utf8 {
                        source_name: self.source_name.clone(),
                        offset: self.offset + e.valid_up_to() as u64,
                    }));
                }
            };
            self.carry = buf.split_off(valid);
            self.offset += valid as u64;
            if ended {
                self.done = true;
            }
            if !buf.is_empty() {
                // `buf[..valid]` was checked just above.
                let text = String::from_utf8(buf).expect("validated UTF-8");
                return Some(Ok(text));
            }
        }
        None
    }
}

/// Summary of a plain text file, computed while streaming it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextStats {
    pub bytes: u64,
    pub chars: u64,
    /// Lines, counting a last line without a newline.
    pub lines: u64,
    /// Paragraphs: runs of non-blank lines.
    pub documents: u64,
    /// Lines that start with "Instruction: ".
    pub instruction_lines: u64,
}

/// Streams a text source and counts bytes, characters, lines, paragraphs and instruction lines.
pub fn text_stats<R: Read>(chunks: TextChunks<R>) -> Result<TextStats> {
    let mut st = TextStats::default();
    let prefix = INSTRUCTION_PREFIX.as_bytes();
    // State of the current line: its length so far and whether it still matches the prefix.
    let mut line_len = 0usize;
    let mut prefix_ok = true;
    let mut line_blank = true;
    let mut prev_blank = true;
    for chunk in chunks {
        let chunk = chunk?;
        st.bytes += chunk.len() as u64;
        st.chars += chunk.chars().count() as u64;
        for &b in chunk.as_bytes() {
            if b == b'\n' {
                st.lines += 1;
                if !line_blank && prev_blank {
                    st.documents += 1;
                }
                prev_blank = line_blank;
                line_len = 0;
                prefix_ok = true;
                line_blank = true;
                continue;
            }
            if !b.is_ascii_whitespace() {
                line_blank = false;
            }
            if prefix_ok && line_len < prefix.len() {
                prefix_ok = b == prefix[line_len];
                if prefix_ok && line_len + 1 == prefix.len() {
                    st.instruction_lines += 1;
                }
            }
            line_len += 1;
        }
    }
    if line_len > 0 {
        st.lines += 1;
        if !line_blank && prev_blank {
            st.documents += 1;
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, prop_assert_eq, proptest, ProptestConfig};

    fn chunks_of(bytes: &[u8], chunk: usize) -> Result<Vec<String>> {
        TextChunks::new("mem", std::io::Cursor::new(bytes.to_vec()), chunk)
            .unwrap()
            .collect()
    }

    /// A reader that returns at most `max` bytes per read, to exercise short reads.
    struct Trickle<'a> {
        data: &'a [u8],
        max: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.data.len().min(self.max).min(out.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn chunks_concatenate_to_the_input(s in "[a-zé€😀\n ]{0,64}", chunk in 1usize..9, max in 1usize..5) {
            let got = chunks_of(s.as_bytes(), chunk).unwrap();
            prop_assert!(got.iter().all(|c| !c.is_empty()));
            prop_assert_eq!(got.concat(), s.clone());
            let trickled: Vec<String> = TextChunks::new("t", Trickle { data: s.as_bytes(), max }, chunk)
                .unwrap()
                .collect::<Result<_>>()
                .unwrap();
            prop_assert_eq!(trickled.concat(), s);
        }

        #[test]
        fn invalid_utf8_names_its_offset(prefix in "[a-z€]{0,20}", chunk in 1usize..9) {
            let mut bytes = prefix.as_bytes().to_vec();
            let at = bytes.len();
            bytes.extend_from_slice(&[0xFF, b'a']);
            let err = chunks_of(&bytes, chunk).unwrap_err();
            prop_assert_eq!(err.to_string(), format!("mem: invalid UTF-8 at byte offset {at}"));
            // A truncated character at the very end is also an error.
            let mut cut = prefix.as_bytes().to_vec();
            cut.extend_from_slice(&"€".as_bytes()[..2]);
            let err = chunks_of(&cut, chunk).unwrap_err();
            prop_assert_eq!(err.to_string(), format!("mem: invalid UTF-8 at byte offset {}", prefix.len()));
        }
    }

    #[test]
    fn stats_count_lines_documents_and_instructions() {
        let text =
            "One two.\nThree.\n\nInstruction: Add 1 and 2.\nResponse: 3\n\n\nInstructio\nlast";
        for chunk in [1, 2, 3, 7, 100] {
            let st = text_stats(TextChunks::new("m", text.as_bytes(), chunk).unwrap()).unwrap();
            assert_eq!(
                st,
                TextStats {
                    bytes: text.len() as u64,
                    chars: text.chars().count() as u64,
                    lines: 9,
                    documents: 3,
                    instruction_lines: 1,
                }
            );
        }
    }

    #[test]
    fn corpus_is_deterministic_and_instructions_are_rare() {
        let g = CorpusGenerator::new(World::new(0));
        let mut a = Vec::new();
        g.write_documents(3_000, &mut Rng::new(1), &mut a).unwrap();
        let mut b = Vec::new();
        g.write_documents(3_000, &mut Rng::new(1), &mut b).unwrap();
        assert_eq!(a, b);
        let st = text_stats(TextChunks::new("c", a.as_slice(), 4096).unwrap()).unwrap();
        assert_eq!(st.documents, 3_000);
        let rate = st.instruction_lines as f64 / st.documents as f64;
        assert!((0.01..0.03).contains(&rate), "instruction rate {rate}");
    }

    #[test]
    fn corpus_has_no_held_out_instructions() {
        let w = World::new(4);
        let g = CorpusGenerator::new(w.clone());
        let mut rng = Rng::new(2);
        let mut found = 0;
        for _ in 0..5_000 {
            let d = g.document(&mut rng);
            if let Some(line) = d.lines().find(|l| l.starts_with(INSTRUCTION_PREFIX)) {
                let p = w
                    .parse(&line[INSTRUCTION_PREFIX.len()..])
                    .expect("a world prompt");
                assert_eq!(p.split, Split::Train, "{line}");
                found += 1;
            }
        }
        assert!(found > 0);
    }
}
