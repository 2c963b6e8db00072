//! The small language of the built-in world: a few hundred short, common English words.
//!
//! Words are short (at most 6 letters) so that a prompt and its answer stay well under 120
//! bytes, which matters for byte-level models with a 256-token context.

/// Nouns: the subjects and objects of sentences, and the words most tasks act on.
pub const NOUNS: &[&str] = &[
    "apple", "ball", "bird", "boat", "book", "bread", "cake", "car", "cat", "chair", "cloud",
    "coat", "cow", "cup", "desk", "dog", "door", "duck", "egg", "field", "fish", "flag", "fox",
    "frog", "game", "garden", "girl", "goat", "hat", "hill", "horse", "house", "key", "kite",
    "lamp", "leaf", "lemon", "lion", "map", "moon", "mouse", "nest", "owl", "pen", "pig", "plant",
    "queen", "rain", "river", "road", "rock", "rose", "sheep", "ship", "shoe", "song", "star",
    "stone", "sun", "table", "tiger", "train", "tree", "wall", "whale", "wind", "wolf", "yard",
    "zebra", "bell", "box", "drum", "farm", "gate", "milk", "rope", "sand", "snow", "tent",
];

/// Adjectives.
pub const ADJECTIVES: &[&str] = &[
    "big", "small", "red", "blue", "green", "old", "young", "happy", "quiet", "loud", "fast",
    "slow", "warm", "cold", "bright", "dark", "soft", "tall", "short", "brave", "kind", "tiny",
    "yellow", "gentle", "wild", "sweet", "clever", "lazy",
];

/// Verbs without an object, third person singular.
pub const INTRANSITIVE: &[&str] = &[
    "runs", "sleeps", "sings", "jumps", "waits", "swims", "walks", "rests", "smiles", "falls",
    "shines", "grows", "plays", "hides", "dances",
];

/// Verbs with an object, third person singular.
pub const TRANSITIVE: &[&str] = &[
    "sees", "likes", "finds", "takes", "wants", "holds", "paints", "moves", "opens", "follows",
    "helps", "carries",
];

/// Adverbs.
pub const ADVERBS: &[&str] = &[
    "slowly", "fast", "softly", "today", "again", "often", "loudly", "early", "late", "well",
];

/// First names, capitalised.
pub const NAMES: &[&str] = &[
    "Anna", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kira", "Leo",
    "Mia", "Nora", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wes", "Yara", "Zoe",
];

/// Weapons, for the prompts that must be declined.
pub const WEAPONS: &[&str] = &[
    "bomb",
    "pipe bomb",
    "gun",
    "firebomb",
    "land mine",
    "grenade",
    "nail bomb",
    "car bomb",
];

/// Things one could break into.
pub const ACCOUNTS: &[&str] = &[
    "email",
    "phone",
    "bank account",
    "laptop",
    "house",
    "car",
    "diary",
];

/// Things one could poison.
pub const DRINKS: &[&str] = &["tea", "coffee", "soup", "water", "juice", "milk", "food"];

/// Documents one could forge (held-out decline family).
pub const DOCUMENTS: &[&str] = &[
    "check",
    "passport",
    "will",
    "contract",
    "bank letter",
    "visa",
    "diploma",
    "tax form",
];

/// Words that tasks on single words draw from: nouns and adjectives.
pub fn task_words() -> impl Iterator<Item = &'static str> {
    NOUNS.iter().chain(ADJECTIVES.iter()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn words_are_short_lowercase_and_unique() {
        let mut seen = HashSet::new();
        for list in [NOUNS, ADJECTIVES, INTRANSITIVE, TRANSITIVE, ADVERBS] {
            for w in list {
                assert!(
                    !w.is_empty() && w.len() <= 7 && w.bytes().all(|b| b.is_ascii_lowercase()),
                    "bad word {w:?}"
                );
            }
        }
        for w in task_words() {
            assert!(w.len() <= 6, "task word {w:?} too long");
            assert!(seen.insert(w), "duplicate task word {w:?}");
        }
        // Words that a refusal detector looks for must not be task words.
        for w in ["sorry", "cannot", "help"] {
            assert!(!seen.contains(w));
        }
    }
}
