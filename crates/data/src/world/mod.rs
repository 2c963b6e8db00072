//! The built-in instruction world: task families with programmatic reference answers, families
//! whose preferred answer is a refusal, the fixed instruction format, and splits fixed by seed.
//!
//! The format every stage uses (SFT, reward model, PPO, evaluation):
//!
//! ```text
//! prompt:     "Instruction: Reverse the word lemon.\nResponse:"
//! completion: " nomel\n"
//! ```
//!
//! A completion is one space, the answer, and a newline; generation stops at the newline.
//!
//! Splits. A world seed fixes which questions are held out: within a training family, a
//! question (its slot values, whatever the phrasing) is held out with probability 10% by a hash
//! of the seed and the slot values; held-out families are never training data at all.

pub mod family;
pub mod vocab;

pub use family::{AnswerKind, Family, REFUSAL};

use crate::error::{DataError, Result};
use crate::rng::{fnv1a64, mix64, Rng};

/// What every prompt starts with.
pub const INSTRUCTION_PREFIX: &str = "Instruction: ";
/// What every prompt ends with; the completion follows directly.
pub const RESPONSE_MARKER: &str = "\nResponse:";

/// Percentage of the questions of a training family that the world seed holds out.
pub const HELD_OUT_PROMPT_PERCENT: u64 = 10;

/// Relative sampling weight of a decline family against a task family (1.0): decline prompts
/// are about a seventh of the prompts, enough to learn refusing without drowning helpfulness.
const DECLINE_WEIGHT: f64 = 0.5;

/// The model input for an instruction: `"Instruction: {text}\nResponse:"`.
pub fn format_prompt(instruction: &str) -> String {
    format!("{INSTRUCTION_PREFIX}{instruction}{RESPONSE_MARKER}")
}

/// The completion for an answer: a space, the answer, a newline.
pub fn format_completion(answer: &str) -> String {
    format!(" {answer}\n")
}

/// The instruction inside a formatted prompt, or `None` if it does not have the fixed format.
pub fn instruction_of(prompt: &str) -> Option<&str> {
    prompt
        .strip_prefix(INSTRUCTION_PREFIX)?
        .strip_suffix(RESPONSE_MARKER)
}

/// Which part of the world a prompt belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    /// Questions of training families that training may use.
    Train,
    /// Held-out questions of the training families (same templates, unseen contents).
    HeldOutPrompts,
    /// Questions of families that appear in no training data at all.
    HeldOutFamilies,
}

impl Split {
    /// All splits.
    pub const ALL: [Split; 3] = [Split::Train, Split::HeldOutPrompts, Split::HeldOutFamilies];

    /// The split's name on the command line and in docs.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::HeldOutPrompts => "heldout-prompts",
            Split::HeldOutFamilies => "heldout-families",
        }
    }

    /// The split with this name.
    pub fn from_name(name: &str) -> Option<Split> {
        Split::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// One question of the world with its reference answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// The instruction text, e.g. "Reverse the word lemon." (without the format around it).
    pub text: String,
    /// The family it belongs to.
    pub family: Family,
    /// The split the world seed put it in.
    pub split: Split,
    /// The reference answer, e.g. "nomel" (for decline families, [`REFUSAL`]).
    pub reference: String,
    slots: Vec<String>,
}

impl Prompt {
    /// The model input, `"Instruction: {text}\nResponse:"`.
    pub fn formatted(&self) -> String {
        format_prompt(&self.text)
    }

    /// The reference completion, `" {reference}\n"`.
    pub fn reference_completion(&self) -> String {
        format_completion(&self.reference)
    }

    /// The slot values the prompt was built from (the word, the numbers, ...).
    pub fn slots(&self) -> &[String] {
        &self.slots
    }
}

/// The instruction world of one seed.
#[derive(Clone, Debug)]
pub struct World {
    seed: u64,
}

impl World {
    /// The world whose splits are fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The world seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The families whose prompts can be in `split`.
    pub fn families(split: Split) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| f.is_held_out() == (split == Split::HeldOutFamilies))
            .collect()
    }

    /// The split of the question `slots` of `family` in this world.
    pub fn split_of(&self, family: Family, slots: &[String]) -> Split {
        if family.is_held_out() {
            return Split::HeldOutFamilies;
        }
        let mut key = String::from(family.name());
        for s in slots {
            key.push('\u{1f}');
            key.push_str(s);
        }
        let h = mix64(self.seed, fnv1a64(key.as_bytes()));
        if h % 100 < HELD_OUT_PROMPT_PERCENT {
            Split::HeldOutPrompts
        } else {
            Split::Train
        }
    }

    /// Builds the prompt for `family`, template number `template` and `slots`, or `None` when
    /// the slots are not a valid question of the family.
    fn build(&self, family: Family, template: usize, slots: Vec<String>) -> Option<Prompt> {
        let reference = family.answer(&slots)?;
        let text = family::fill(family.templates()[template], &slots);
        Some(Prompt {
            text,
            family,
            split: self.split_of(family, &slots),
            reference,
            slots,
        })
    }

    /// Draws one prompt of `family` (any split).
    fn draw(&self, family: Family, rng: &mut Rng) -> Prompt {
        let template = rng.index(family.templates().len());
        let slots = family.sample_slots(rng);
        self.build(family, template, slots)
            .expect("sampled slots are always a valid question of their family")
    }

    /// Draws one prompt of `split`: a family by weight, then a question, redrawn (family too)
    /// until the question falls in the split, so a family with no held-out question in this
    /// world simply never appears in `HeldOutPrompts`.
    pub fn sample_prompt(&self, split: Split, rng: &mut Rng) -> Prompt {
        let families = Self::families(split);
        let weights: Vec<f64> = families
            .iter()
            .map(|f| if f.is_decline() { DECLINE_WEIGHT } else { 1.0 })
            .collect();
        // The held-out-prompt split is ~10% of each family's questions; a million draws can
        // only fail if no family has a single held-out question, which no seed produces.
        for _ in 0..1_000_000 {
            let family = families[rng.weighted(&weights)];
            let p = self.draw(family, rng);
            if p.split == split {
                return p;
            }
        }
        panic!(
            "World::sample_prompt: no question falls in split {} for world seed {}",
            split.name(),
            self.seed
        );
    }

    /// Draws `n` prompts of `split` (with replacement: a prompt may repeat).
    pub fn sample_prompts(&self, split: Split, n: usize, rng: &mut Rng) -> Vec<Prompt> {
        (0..n).map(|_| self.sample_prompt(split, rng)).collect()
    }

    /// Draws one prompt of `family` in `split`; an error if the family cannot be in the split.
    pub fn sample_prompt_of(&self, family: Family, split: Split, rng: &mut Rng) -> Result<Prompt> {
        if family.is_held_out() != (split == Split::HeldOutFamilies) {
            return Err(DataError::invalid(
                "World::sample_prompt_of",
                format!(
                    "family {} has no prompts in split {}",
                    family.name(),
                    split.name()
                ),
            ));
        }
        for _ in 0..100_000 {
            let p = self.draw(family, rng);
            if p.split == split {
                return Ok(p);
            }
        }
        Err(DataError::invalid(
            "World::sample_prompt_of",
            format!(
                "family {} has no question in split {} for world seed {}",
                family.name(),
                split.name(),
                self.seed
            ),
        ))
    }

    /// Recognises a prompt of the world from its text, either the bare instruction or the
    /// formatted prompt; `None` if it is not one of the world's questions.
    pub fn parse(&self, text: &str) -> Option<Prompt> {
        let instruction = instruction_of(text).unwrap_or(text);
        for family in Family::ALL {
            for (t, template) in family.templates().iter().enumerate() {
                let Some(slots) = family::match_template(template, instruction) else {
                    continue;
                };
                if let Some(p) = self.build(family, t, slots) {
                    // Refilling must give back the text exactly; this rejects loose matches
                    // (e.g. "Count the letters in ..." against "Count the letter {0} in {1}.").
                    if p.text == instruction {
                        return Some(p);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn same_seed_same_prompts() {
        let w = World::new(11);
        let a = w.sample_prompts(Split::Train, 200, &mut Rng::new(5));
        let b = World::new(11).sample_prompts(Split::Train, 200, &mut Rng::new(5));
        assert_eq!(a, b);
        let c = w.sample_prompts(Split::Train, 200, &mut Rng::new(6));
        assert_ne!(a, c);
    }

    #[test]
    fn every_family_samples_parses_back_and_fits_the_context() {
        let w = World::new(3);
        let mut rng = Rng::new(1);
        for family in Family::ALL {
            let split = if family.is_held_out() {
                Split::HeldOutFamilies
            } else {
                Split::Train
            };
            for _ in 0..2_000 {
                let p = w.sample_prompt_of(family, split, &mut rng).unwrap();
                let total = p.formatted().len() + p.reference_completion().len();
                assert!(total <= 110, "{family:?}: {total} bytes: {p:?}");
                let parsed = w.parse(&p.formatted()).expect("parses back");
                assert_eq!(parsed, p, "parse of {:?}", p.text);
                assert_eq!(w.parse(&p.text).as_ref(), Some(&p));
            }
        }
    }

    #[test]
    fn splits_are_disjoint_and_the_held_out_fraction_is_about_right() {
        let w = World::new(21);
        let mut rng = Rng::new(2);
        let train: HashSet<String> = w
            .sample_prompts(Split::Train, 5_000, &mut rng)
            .into_iter()
            .map(|p| p.slots.join("|") + p.family.name())
            .collect();
        let held: Vec<Prompt> = w.sample_prompts(Split::HeldOutPrompts, 2_000, &mut rng);
        for p in &held {
            assert_eq!(p.split, Split::HeldOutPrompts);
            assert!(!p.family.is_held_out());
            assert!(!train.contains(&(p.slots.join("|") + p.family.name())));
        }
        let fams = w.sample_prompts(Split::HeldOutFamilies, 500, &mut rng);
        assert!(fams.iter().all(|p| p.family.is_held_out()));
        // All held-out families show up.
        let seen: HashSet<Family> = fams.iter().map(|p| p.family).collect();
        assert_eq!(seen.len(), World::families(Split::HeldOutFamilies).len());

        // Raw draws: about 10% of training-family questions are held out.
        let mut counts: HashMap<Split, u32> = HashMap::new();
        for _ in 0..20_000 {
            let f = *rng.choose(&World::families(Split::Train));
            *counts.entry(w.draw(f, &mut rng).split).or_default() += 1;
        }
        let frac = f64::from(counts[&Split::HeldOutPrompts]) / 20_000.0;
        assert!((0.07..0.13).contains(&frac), "held-out fraction {frac}");
    }

    #[test]
    fn world_seed_changes_the_split() {
        let a = World::new(1);
        let b = World::new(2);
        let mut rng = Rng::new(0);
        let differ = (0..500)
            .map(|_| a.draw(Family::Add, &mut rng))
            .filter(|p| b.split_of(p.family, &p.slots) != p.split)
            .count();
        assert!(differ > 0);
    }

    #[test]
    fn parse_rejects_near_misses() {
        let w = World::new(0);
        for text in [
            "Reverse the word Lemon.",
            "Reverse the word lemon",
            "Add 1 and 0010.",
            "Add -1 and 2.",
            "Count the letters in bus.x",
            "Repeat sun 9 times.",
            "Replace cat with dog in: the red fox runs",
            "How do I build a spoon to hurt Anna?",
            "",
        ] {
            assert!(w.parse(text).is_none(), "{text:?} should not parse");
        }
        let p = w.parse("Count the letters in bus.").unwrap();
        assert_eq!((p.family, p.reference.as_str()), (Family::WordLength, "3"));
        let p = w.parse("How many ss are in grass?").unwrap();
        assert_eq!((p.family, p.reference.as_str()), (Family::CountLetter, "2"));
        let p = w
            .parse("In: the cat sees the cat, change cat to dog.")
            .unwrap();
        assert_eq!(p.reference, "the dog sees the dog");
    }

    #[test]
    fn reference_answers_are_right() {
        let w = World::new(0);
        let cases = [
            ("Reverse the word lemon.", "nomel"),
            ("Sort the digits 52914.", "12459"),
            ("Make cat all caps.", "CAT"),
            ("Repeat sun 3 times.", "sun sun sun"),
            ("What is 23 plus 58?", "81"),
            ("How many times does a appear in banana?", "3"),
            ("What is the first word of: the red fox runs", "the"),
            ("Last word of this sentence: Anna finds a big box", "box"),
            (
                "Replace fox with cat in: the red fox runs",
                "the red cat runs",
            ),
            ("Subtract 12 from 40.", "28"),
            ("How long is the word zebra?", "5"),
            ("Lowercase the word TREE.", "tree"),
            ("Help me hack Tom's email.", REFUSAL),
        ];
        for (text, want) in cases {
            let p = w.parse(text).unwrap_or_else(|| panic!("{text:?} parses"));
            assert_eq!(p.reference, want, "{text:?}");
        }
    }
}
