//! The simulated labeler: a deterministic score for any (prompt, response), and noisy rankings
//! drawn from a Plackett-Luce model on those scores (Bradley-Terry for two responses).
//!
//! The rules are written out in docs/labeler.md. In short, with the completion split at its
//! first newline into an answer line and the rest:
//!
//! - correctness in [0, 1]: 1 for the exact reference; partial credit, at most 0.8, for near
//!   misses (numeric distance for numbers, edit distance for text); 0.8 for the right answer
//!   followed by more words on the same line; for decline prompts 1 for the canonical refusal and
//!   0.9 for another refusal;
//! - format in [0, 1]: 1, minus 0.5 if the answer never ends with a newline, minus 0.5 if
//!   anything but whitespace follows the newline (rambling), minus 0.2 if the answer line is not
//!   exactly one space and the answer;
//! - penalty: 0.25 for refusing a benign prompt, 0.5 for going along with a harmful one;
//! - score = 0.75 correctness + 0.25 format - penalty, in [-0.5, 1]; only the exact reference
//!   completion reaches 1.
//!
//! Two labelers with independent noise agree on about 73% of typical pairs (the InstructGPT
//! paper measured 72.6 ± 1.5% between its human labelers); the temperature that gives this is
//! calibrated by [`calibrate_temperature`] and pinned in [`DEFAULT_TEMPERATURE`].
//!
//! Only the labeler judges: training stages see rankings and preferences, never scores.

use crate::error::{DataError, Result};
use crate::responses::sample_distinct_responses;
use crate::rng::Rng;
use crate::world::{AnswerKind, Prompt, Split, World, REFUSAL};

/// The Plackett-Luce temperature that makes two labelers agree on 73% of typical pairs, as
/// found by `calibrate_temperature(&World::new(0), 20_000, 0x1abe1, 0.73)` (see the test
/// `default_temperature_is_calibrated`, which recomputes it).
pub const DEFAULT_TEMPERATURE: f64 = 0.2218;

/// The agreement rate the default temperature is calibrated to.
pub const TARGET_AGREEMENT: f64 = 0.73;

const WEIGHT_CORRECTNESS: f64 = 0.75;
const WEIGHT_FORMAT: f64 = 0.25;
/// Partial credit never exceeds this, so a wrong answer never ties the reference.
const PARTIAL_CAP: f64 = 0.8;
const OTHER_REFUSAL_CREDIT: f64 = 0.9;
const PENALTY_REFUSED_BENIGN: f64 = 0.25;
const PENALTY_COMPLIED_HARMFUL: f64 = 0.5;
const FORMAT_NO_NEWLINE: f64 = 0.5;
const FORMAT_RAMBLING: f64 = 0.5;
const FORMAT_SPACING: f64 = 0.2;

/// Phrases that mark an answer as a refusal (matched case-insensitively anywhere in the answer).
pub const REFUSAL_MARKERS: &[&str] = &[
    "can't help",
    "cannot help",
    "can not help",
    "won't help",
    "will not help",
    "i can't",
    "i cannot",
    "i won't",
    "i will not",
    "sorry",
];

/// Whether an answer declines (see [`REFUSAL_MARKERS`]).
pub fn is_refusal(answer: &str) -> bool {
    let lower = answer.to_lowercase();
    REFUSAL_MARKERS.iter().any(|m| lower.contains(m))
}

/// The parts of a score, for docs, debugging and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    /// Correctness of the answer line in [0, 1].
    pub correctness: f64,
    /// Format in [0, 1].
    pub format: f64,
    /// Whether the answer line is a refusal.
    pub refused: bool,
    /// Subtracted for refusing a benign prompt or complying with a harmful one.
    pub penalty: f64,
    /// `0.75 correctness + 0.25 format - penalty`.
    pub score: f64,
}

/// Character-level Levenshtein distance (answers are short: O(nm) is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// 1 - edit distance / longer length, in [0, 1].
fn text_similarity(answer: &str, reference: &str) -> f64 {
    let longest = answer.chars().count().max(reference.chars().count());
    if longest == 0 {
        return 1.0;
    }
    1.0 - edit_distance(answer, reference) as f64 / longest as f64
}

/// Closeness of two numbers: 1 - |a - r| / (|r| + 10), floored at 0. Being off by one on a
/// count is a smaller miss than being off by ten on a sum, but both earn something.
fn numeric_similarity(answer: i64, reference: i64) -> f64 {
    let d = (answer - reference).abs() as f64;
    (1.0 - d / (reference.abs() as f64 + 10.0)).max(0.0)
}

/// Scores a completion for a prompt (deterministic). See the module docs for the rules.
pub fn judge(prompt: &Prompt, response: &str) -> Judgement {
    let (line, rest, terminated) = match response.find('\n') {
        Some(i) => (&response[..i], &response[i + 1..], true),
        None => (response, "", false),
    };
    let answer = line.trim();

    let mut format = 1.0;
    if !terminated {
        format -= FORMAT_NO_NEWLINE;
    }
    if !rest.trim().is_empty() {
        format -= FORMAT_RAMBLING;
    }
    if line.strip_prefix(' ') != Some(answer) {
        format -= FORMAT_SPACING;
    }
    let format: f64 = f64::max(format, 0.0);

    let refused = is_refusal(answer);
    let reference = prompt.reference.as_str();
    let (correctness, penalty) = match prompt.family.answer_kind() {
        AnswerKind::Refusal => {
            if answer == REFUSAL {
                (1.0, 0.0)
            } else if refused {
                (OTHER_REFUSAL_CREDIT, 0.0)
            } else {
                (0.0, PENALTY_COMPLIED_HARMFUL)
            }
        }
        _ if refused => (0.0, PENALTY_REFUSED_BENIGN),
        _ if answer == reference => (1.0, 0.0),
        _ if answer
            .strip_prefix(reference)
            .is_some_and(|more| more.starts_with(' ')) =>
        {
            // The right answer, buried in more words on the same line.
            (PARTIAL_CAP, 0.0)
        }
        kind => {
            let sim = match (kind, answer.parse::<i64>(), reference.parse::<i64>()) {
                (AnswerKind::Number, Ok(a), Ok(r)) => numeric_similarity(a, r),
                _ if answer.is_empty() => 0.0,
                _ => text_similarity(answer, reference),
            };
            (PARTIAL_CAP * sim, 0.0)
        }
    };
    let score = WEIGHT_CORRECTNESS * correctness + WEIGHT_FORMAT * format - penalty;
    Judgement {
        correctness,
        format,
        refused,
        penalty,
        score,
    }
}

/// A simulated labeler: deterministic scores, rankings with Plackett-Luce noise.
#[derive(Clone, Debug)]
pub struct Labeler {
    temperature: f64,
}

impl Default for Labeler {
    fn default() -> Self {
        Self::new()
    }
}

impl Labeler {
    /// The labeler calibrated to 73% inter-labeler agreement.
    pub fn new() -> Self {
        Self {
            temperature: DEFAULT_TEMPERATURE,
        }
    }

    /// A labeler with another noise temperature (> 0; smaller is less noisy).
    pub fn with_temperature(temperature: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(DataError::invalid(
                "Labeler::with_temperature",
                format!("temperature must be finite and > 0, got {temperature}"),
            ));
        }
        Ok(Self { temperature })
    }

    /// The noise temperature.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The labeler's score of a completion, in [-0.5, 1]. For evaluation and tests: training
    /// stages must learn from `rank` / `prefer_first` only.
    pub fn score(&self, prompt: &Prompt, response: &str) -> f64 {
        judge(prompt, response).score
    }

    /// Ranks responses: `ranks[i]` is the rank of `responses[i]`, 1 = best. Identical responses
    /// tie (share a rank, competition style: 1, 1, 3). Otherwise a Plackett-Luce sample with
    /// weights exp(score / temperature), drawn by adding Gumbel noise to score / temperature and
    /// sorting (the Gumbel-max trick), so for two responses P(first wins) = σ(Δscore / T).
    pub fn rank<S: AsRef<str>>(&self, prompt: &Prompt, responses: &[S], rng: &mut Rng) -> Vec<u32> {
        let mut keys: Vec<f64> = Vec::with_capacity(responses.len());
        for (i, r) in responses.iter().enumerate() {
            let r = r.as_ref();
            // A duplicate takes the key of its first occurrence: no fresh noise, so it ties.
            let key = match responses[..i].iter().position(|o| o.as_ref() == r) {
                Some(j) => keys[j],
                None => self.score(prompt, r) / self.temperature + rng.gumbel(),
            };
            keys.push(key);
        }
        keys.iter()
            .map(|&k| 1 + keys.iter().filter(|&&o| o > k).count() as u32)
            .collect()
    }

    /// Whether the labeler prefers `a` to `b` (a Bradley-Terry draw; identical responses are a
    /// coin flip).
    pub fn prefer_first(&self, prompt: &Prompt, a: &str, b: &str, rng: &mut Rng) -> bool {
        if a == b {
            return rng.chance(0.5);
        }
        let d = (self.score(prompt, a) - self.score(prompt, b)) / self.temperature;
        rng.gumbel() + d > rng.gumbel()
    }
}

/// A pair of distinct candidate responses to one prompt, as comparison data would hold it.
#[derive(Clone, Debug)]
pub struct TypicalPair {
    pub prompt: Prompt,
    pub a: String,
    pub b: String,
}

/// `n` typical pairs: training prompts, each with two distinct responses from the comparison
/// generator's perturbation mix.
pub fn typical_pairs(world: &World, n: usize, seed: u64) -> Result<Vec<TypicalPair>> {
    let mut rng = Rng::derive(seed, "typical-pairs");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let prompt = world.sample_prompt(Split::Train, &mut rng);
        let mut r = sample_distinct_responses(world, &prompt, 2, &mut rng)?;
        let b = r.pop().expect("two responses");
        let a = r.pop().expect("two responses");
        out.push(TypicalPair { prompt, a, b });
    }
    Ok(out)
}

/// Expected agreement of two independent labelers at `temperature` on pairs whose score
/// differences are `deltas`: mean of p² + (1-p)² with p = σ(Δ / T).
pub fn expected_agreement(deltas: &[f64], temperature: f64) -> f64 {
    if deltas.is_empty() {
        return f64::NAN;
    }
    let sum: f64 = deltas
        .iter()
        .map(|&d| {
            let p = 1.0 / (1.0 + (-d / temperature).exp());
            p * p + (1.0 - p) * (1.0 - p)
        })
        .sum();
    sum / deltas.len() as f64
}

/// The temperature at which two independent labelers agree on `target` of `n` typical pairs
/// (in expectation), found by bisection on log T (agreement falls monotonically with T).
pub fn calibrate_temperature(world: &World, n: usize, seed: u64, target: f64) -> Result<f64> {
    let pairs = typical_pairs(world, n, seed)?;
    let deltas: Vec<f64> = pairs
        .iter()
        .map(|p| judge(&p.prompt, &p.a).score - judge(&p.prompt, &p.b).score)
        .collect();
    let (mut lo, mut hi) = (1e-4f64.ln(), 1e2f64.ln());
    let ceiling = expected_agreement(&deltas, lo.exp());
    if !(target > 0.5 && target < ceiling) {
        return Err(DataError::invalid(
            "calibrate_temperature",
            format!(
                "target agreement {target} outside (0.5, {ceiling:.4}) reachable on these pairs"
            ),
        ));
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if expected_agreement(&deltas, mid.exp()) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok((0.5 * (lo + hi)).exp())
}

/// Agreement between two labelers on a set of pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    pub agreed: usize,
    pub comparisons: usize,
}

impl Agreement {
    /// Fraction of comparisons on which the two labelers picked the same response.
    pub fn rate(&self) -> f64 {
        self.agreed as f64 / self.comparisons as f64
    }
}

/// Lets two labelers with independent noise (seeds derived from `seed`) judge `n` typical pairs
/// and counts how often they pick the same response.
pub fn measure_agreement(
    labeler: &Labeler,
    world: &World,
    n: usize,
    seed: u64,
) -> Result<Agreement> {
    let pairs = typical_pairs(world, n, seed)?;
    let mut first = Rng::derive(seed, "labeler-1");
    let mut second = Rng::derive(seed, "labeler-2");
    let agreed = pairs
        .iter()
        .filter(|p| {
            let x = labeler.prefer_first(&p.prompt, &p.a, &p.b, &mut first);
            let y = labeler.prefer_first(&p.prompt, &p.a, &p.b, &mut second);
            x == y
        })
        .count();
    Ok(Agreement {
        agreed,
        comparisons: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responses::sample_response;
    use crate::world::Family;

    #[test]
    fn edit_distance_small_cases() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("nomel", "lemon"), 4);
        assert_eq!(text_similarity("abcd", "abce"), 0.75);
    }

    #[test]
    fn each_family_reference_gets_the_top_score() {
        let w = World::new(0);
        let mut rng = Rng::new(12);
        for family in Family::ALL {
            let split = if family.is_held_out() {
                Split::HeldOutFamilies
            } else {
                Split::Train
            };
            for _ in 0..200 {
                let p = w.sample_prompt_of(family, split, &mut rng).unwrap();
                let top = judge(&p, &p.reference_completion());
                assert_eq!(top.score, 1.0, "{family:?} {p:?} {top:?}");
                for _ in 0..20 {
                    let r = sample_response(&w, &p, &mut rng);
                    let s = judge(&p, &r).score;
                    if r == p.reference_completion() {
                        assert_eq!(s, 1.0);
                    } else {
                        assert!(s < 1.0, "{family:?}: {r:?} scored {s} for {p:?}");
                    }
                    assert!((-0.5..=1.0).contains(&s));
                }
            }
        }
    }

    #[test]
    fn scoring_rules() {
        let w = World::new(0);
        let p = w.parse("Reverse the word lemon.").unwrap();
        let s = |r: &str| judge(&p, r).score;
        assert_eq!(s(" nomel\n"), 1.0);
        // No newline: format 0.5.
        assert!((s(" nomel") - (0.75 + 0.125)).abs() < 1e-12);
        // Rambling after the newline.
        assert!((s(" nomel\nInstruction: Add 1 and 2.\n") - 0.875).abs() < 1e-12);
        // Spacing.
        assert!((s("nomel\n") - 0.95).abs() < 1e-12);
        // Partial credit: one letter off of five.
        assert!((s(" nomal\n") - (0.75 * 0.8 * 0.8 + 0.25)).abs() < 1e-12);
        // Refusing a benign prompt is worse than a wrong answer.
        assert!(s(" I can't help with that.\n") < s(" lemon\n"));
        assert!(s(" I can't help with that.\n") <= 0.0);

        let h = w.parse("Help me hack Tom's email.").unwrap();
        let s = |r: &str| judge(&h, r).score;
        assert_eq!(s(" I can't help with that.\n"), 1.0);
        assert!((s(" Sorry, I won't do that.\n") - (0.75 * 0.9 + 0.25)).abs() < 1e-12);
        assert!(s(" Sure, here is how.\n") < 0.0);

        let n = w.parse("What is 23 plus 58?").unwrap();
        let s = |r: &str| judge(&n, r).score;
        assert!(s(" 80\n") > s(" 70\n"));
        assert!(s(" 70\n") > s(" cat\n"));
        assert!((s(" 81 and more\n") - (0.75 * 0.8 + 0.25)).abs() < 1e-12);
    }

    #[test]
    fn rank_is_a_permutation_with_ties_for_duplicates() {
        let w = World::new(0);
        let p = w.parse("Reverse the word lemon.").unwrap();
        let l = Labeler::new();
        let mut rng = Rng::new(1);
        let r = l.rank(&p, &[" nomel\n", " lemon\n", " nomel\n", ""], &mut rng);
        assert_eq!(r[0], r[2]);
        let mut sorted = r.clone();
        sorted.sort_unstable();
        assert!(sorted == [1, 1, 3, 4] || sorted == [1, 2, 2, 4] || sorted == [1, 2, 3, 3]);
        // With almost no noise the ranking follows the scores.
        let sharp = Labeler::with_temperature(1e-6).unwrap();
        let r = sharp.rank(&p, &[" lemon\n", " nomel\n", " nomal\n", ""], &mut rng);
        assert_eq!(r, vec![3, 1, 2, 4]);
        assert!(Labeler::with_temperature(0.0).is_err());
        assert!(Labeler::with_temperature(f64::NAN).is_err());
    }

    #[test]
    fn bradley_terry_win_rate_matches_sigmoid() {
        // For two responses the labeler's win probability is σ(Δ / T).
        let w = World::new(0);
        let p = w.parse("Reverse the word lemon.").unwrap();
        let l = Labeler::new();
        let (a, b) = (" nomel\n", " nomal\n");
        let d = (l.score(&p, a) - l.score(&p, b)) / l.temperature();
        let want = 1.0 / (1.0 + (-d).exp());
        let mut rng = Rng::new(3);
        let n = 40_000;
        let wins_pair = (0..n)
            .filter(|_| l.prefer_first(&p, a, b, &mut rng))
            .count();
        let wins_rank = (0..n)
            .filter(|_| l.rank(&p, &[a, b], &mut rng)[0] == 1)
            .count();
        for wins in [wins_pair, wins_rank] {
            let got = wins as f64 / n as f64;
            // sd ~ 0.0025; 4 sd.
            assert!((got - want).abs() < 0.01, "win rate {got} want {want}");
        }
    }

    #[test]
    fn default_temperature_is_calibrated() {
        let t = calibrate_temperature(&World::new(0), 20_000, 0x1abe1, TARGET_AGREEMENT).unwrap();
        assert!(
            (t / DEFAULT_TEMPERATURE - 1.0).abs() < 0.01,
            "calibrated {t}, pinned {DEFAULT_TEMPERATURE}"
        );
    }

    #[test]
    fn two_labelers_agree_73_percent_over_2000_comparisons() {
        let a = measure_agreement(&Labeler::new(), &World::new(0), 2_000, 2024).unwrap();
        let rate = a.rate();
        assert_eq!(a.comparisons, 2_000);
        assert!((0.70..=0.76).contains(&rate), "agreement {rate}");
        // Other seeds (world and noise) stay in the band too.
        let b = measure_agreement(&Labeler::new(), &World::new(9), 2_000, 77).unwrap();
        assert!((0.70..=0.76).contains(&b.rate()), "agreement {}", b.rate());
        // And with a far sharper labeler agreement rises, so the test can fail.
        let sharp = Labeler::with_temperature(DEFAULT_TEMPERATURE / 10.0).unwrap();
        let c = measure_agreement(&sharp, &World::new(0), 2_000, 2024).unwrap();
        assert!(c.rate() > 0.8, "sharp agreement {}", c.rate());
    }
}
