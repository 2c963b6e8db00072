//! Candidate responses for comparisons: the reference answer and perturbations of it.
//!
//! Until a policy model exists to sample from, comparison data ranks these: typos, plausible
//! wrong answers, truncations, echoes of the instruction, refusals of benign prompts, compliance
//! with harmful ones, and format faults (no newline, rambling on, odd spacing). The mix is what
//! "typical pairs" means when the labeler's noise is calibrated (see `labeler`).

use crate::error::{DataError, Result};
use crate::rng::Rng;
use crate::world::{family, format_completion, Prompt, Split, World, REFUSAL};

/// Largest number of responses per prompt (the InstructGPT paper ranked K = 4..9).
pub const MAX_K: usize = 9;

/// What the answer line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Reference,
    Typo,
    Wrong,
    Truncated,
    Empty,
    Echo,
    Refusal,
    OtherRefusal,
    Comply,
}

/// How the answer is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Clean,
    NoNewline,
    RambleNextLine,
    RambleSameLine,
    BadSpacing,
}

const BENIGN_CONTENT: &[(Content, f64)] = &[
    (Content::Reference, 0.30),
    (Content::Typo, 0.15),
    (Content::Wrong, 0.20),
    (Content::Truncated, 0.08),
    (Content::Empty, 0.04),
    (Content::Echo, 0.05),
    (Content::Refusal, 0.06),
    (Content::OtherRefusal, 0.02),
];

const DECLINE_CONTENT: &[(Content, f64)] = &[
    (Content::Reference, 0.35),
    (Content::OtherRefusal, 0.20),
    (Content::Comply, 0.30),
    (Content::Truncated, 0.05),
    (Content::Empty, 0.05),
    (Content::Echo, 0.05),
];

const LAYOUTS: &[(Layout, f64)] = &[
    (Layout::Clean, 0.60),
    (Layout::NoNewline, 0.10),
    (Layout::RambleNextLine, 0.15),
    (Layout::RambleSameLine, 0.07),
    (Layout::BadSpacing, 0.08),
];

const OTHER_REFUSALS: &[&str] = &[
    "Sorry, I won't do that.",
    "I cannot help with this.",
    "No, I won't help with that.",
    "Sorry, I can't.",
];

fn draw<T: Copy>(rng: &mut Rng, table: &[(T, f64)]) -> T {
    let weights: Vec<f64> = table.iter().map(|&(_, w)| w).collect();
    table[rng.weighted(&weights)].0
}

/// One character changed: substituted, deleted, doubled or swapped with its neighbour.
fn typo(answer: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = answer.chars().collect();
    if chars.is_empty() {
        return "x".to_string();
    }
    let i = rng.index(chars.len());
    match rng.below(4) {
        0 => {
            let c = chars[i];
            chars[i] = if c.is_ascii_digit() {
                char::from(b'0' + ((c as u8 - b'0' + 1 + rng.below(9) as u8) % 10))
            } else if c.is_ascii_uppercase() {
                char::from(b'A' + ((c as u8 - b'A' + 1 + rng.below(25) as u8) % 26))
            } else if c.is_ascii_lowercase() {
                char::from(b'a' + ((c as u8 - b'a' + 1 + rng.below(25) as u8) % 26))
            } else {
                'x'
            };
        }
        1 if chars.len() > 1 => {
            chars.remove(i);
        }
        2 if i + 1 < chars.len() && chars[i] != chars[i + 1] => chars.swap(i, i + 1),
        _ => chars.insert(i, chars[i]),
    }
    chars.into_iter().collect()
}

fn answer_text(prompt: &Prompt, content: Content, rng: &mut Rng) -> String {
    match content {
        Content::Reference => prompt.reference.clone(),
        Content::Typo => typo(&prompt.reference, rng),
        Content::Wrong => prompt
            .family
            .wrong_answer(prompt.slots(), &prompt.reference, rng),
        Content::Truncated => {
            let chars: Vec<char> = prompt.reference.chars().collect();
            let keep = if chars.len() > 1 {
                rng.range(1, chars.len() as u64 - 1) as usize
            } else {
                0
            };
            chars[..keep].iter().collect()
        }
        Content::Empty => String::new(),
        Content::Echo => prompt.text.clone(),
        Content::Refusal => REFUSAL.to_string(),
        Content::OtherRefusal => rng.choose(OTHER_REFUSALS).to_string(),
        Content::Comply => family::compliance(rng),
    }
}

/// Text a model that does not know when to stop would go on with: another instruction of the
/// training split, or a sentence of the small language.
fn ramble(world: &World, rng: &mut Rng) -> String {
    if rng.chance(0.5) {
        let p = world.sample_prompt(Split::Train, rng);
        format!("Instruction: {}", p.text)
    } else {
        format!("{}.", family::sentence(rng))
    }
}

/// One candidate completion for `prompt`, drawn from the perturbation mix.
pub fn sample_response(world: &World, prompt: &Prompt, rng: &mut Rng) -> String {
    let table = if prompt.family.is_decline() {
        DECLINE_CONTENT
    } else {
        BENIGN_CONTENT
    };
    let content = draw(rng, table);
    let answer = answer_text(prompt, content, rng);
    match draw(rng, LAYOUTS) {
        Layout::Clean => format_completion(&answer),
        Layout::NoNewline => format!(" {answer}"),
        Layout::RambleNextLine => format!(" {answer}\n{}\n", ramble(world, rng)),
        Layout::RambleSameLine => format!(" {answer} and {}\n", family::sentence(rng)),
        Layout::BadSpacing => {
            if rng.chance(0.5) {
                format!("{answer}\n")
            } else {
                format!("  {answer} \n")
            }
        }
    }
}

/// `k` distinct candidate completions for `prompt` (2 <= k <= [`MAX_K`]).
pub fn sample_distinct_responses(
    world: &World,
    prompt: &Prompt,
    k: usize,
    rng: &mut Rng,
) -> Result<Vec<String>> {
    if !(2..=MAX_K).contains(&k) {
        return Err(DataError::invalid(
            "sample_distinct_responses",
            format!("k must be in 2..={MAX_K}, got {k}"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(k);
    // The mix has hundreds of distinct outcomes per prompt; a few dozen draws always suffice.
    for _ in 0..10_000 {
        let r = sample_response(world, prompt, rng);
        if !out.contains(&r) {
            out.push(r);
            if out.len() == k {
                return Ok(out);
            }
        }
    }
    Err(DataError::invalid(
        "sample_distinct_responses",
        format!(
            "could not draw {k} distinct responses for {:?}",
            prompt.text
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_distinct_and_deterministic() {
        let w = World::new(0);
        let mut rng = Rng::new(4);
        let prompts = w.sample_prompts(Split::Train, 300, &mut rng);
        for (i, p) in prompts.iter().enumerate() {
            let a = sample_distinct_responses(&w, p, 9, &mut Rng::new(i as u64)).unwrap();
            let b = sample_distinct_responses(&w, p, 9, &mut Rng::new(i as u64)).unwrap();
            assert_eq!(a, b);
            for (x, r) in a.iter().enumerate() {
                assert!(!a[..x].contains(r));
            }
        }
        assert!(sample_distinct_responses(&w, &prompts[0], 1, &mut rng).is_err());
        assert!(sample_distinct_responses(&w, &prompts[0], 10, &mut rng).is_err());
    }

    #[test]
    fn typo_changes_the_answer() {
        let mut rng = Rng::new(8);
        for word in ["a", "ab", "nomel", "12459", "CAT"] {
            for _ in 0..200 {
                assert_ne!(typo(word, &mut rng), word);
            }
        }
    }
}
