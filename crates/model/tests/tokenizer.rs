//! Tokenizers: exact round trips on any UTF-8 text, and GPT-2 ids equal to the published
//! tokenizer's.

use proptest::prelude::*;
use rlhf_model::{ByteTokenizer, Gpt2Tokenizer, Tokenizer};

/// (text, ids) pairs from Python `tiktoken` 0.12 with the published r50k_base ranks (checked
/// against tiktoken's SHA-256 for r50k_base.tiktoken) and tiktoken's own r50k_base pattern:
/// `tools/gpt2_token_ids.py` prints them (its docstring says how to run it offline).
/// `encode_ordinary`, so special-token text is plain text.
const GPT2_CASES: &[(&str, &[u32])] = &[
    ("Hello world", &[15496, 995]),
    (
        "The quick brown fox jumps over the lazy dog.",
        &[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    ),
    (
        "  leading and trailing spaces  ",
        &[220, 3756, 290, 25462, 9029, 220, 220],
    ),
    (
        "It's we'll they've I'd you're",
        &[1026, 338, 356, 1183, 484, 1053, 314, 1549, 345, 821],
    ),
    (
        "tab\tnewline\nCRLF\r\n",
        &[8658, 197, 3605, 1370, 198, 34, 7836, 37, 201, 198],
    ),
    (
        "Numbers: 3.14159, 1,000,000 and 2024!",
        &[
            49601, 25, 513, 13, 1415, 19707, 11, 352, 11, 830, 11, 830, 290, 48609, 0,
        ],
    ),
    (
        "naïve café — résumé",
        &[2616, 38776, 40304, 851, 40560, 16345, 2634],
    ),
    (
        "日本語のテキスト",
        &[33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302],
    ),
    (
        "emoji 🤖🚀 done",
        &[368, 31370, 12520, 97, 244, 8582, 248, 222, 1760],
    ),
    (
        "def f(x):\n    return x ** 2  # square",
        &[
            4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 12429, 362, 220, 1303, 6616,
        ],
    ),
    ("<|endoftext|>", &[27, 91, 437, 1659, 5239, 91, 29]),
    (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4",
        &[
            198, 198, 20490, 25, 1867, 318, 362, 10, 17, 30, 198, 198, 48902, 25, 604,
        ],
    ),
    (
        "ends with spaces and newlines  \n\n",
        &[2412, 351, 9029, 290, 649, 6615, 220, 220, 628],
    ),
];

#[test]
fn gpt2_ids_match_the_published_tokenizer() {
    let t = Gpt2Tokenizer::new().unwrap();
    assert_eq!(t.vocab_size(), 50257);
    for (text, ids) in GPT2_CASES {
        assert_eq!(t.encode(text), *ids, "{text:?}");
        assert_eq!(t.decode(ids).unwrap(), *text);
    }
    // With special tokens allowed, the marker becomes id 50256 (tiktoken: [64, 50256, 65]).
    assert_eq!(
        t.encode_with_special("a<|endoftext|>b"),
        vec![64, 50256, 65]
    );
    assert_eq!(t.decode(&[64, 50256, 65]).unwrap(), "a<|endoftext|>b");
    let msg = t.decode(&[1, 50257]).unwrap_err().to_string();
    assert!(msg.contains("id 50257 at position 1"), "{msg}");
}

#[test]
fn partial_characters_decode_lossily_but_bytes_exactly() {
    let t = Gpt2Tokenizer::new().unwrap();
    // " 🤖" is split over ids [12520, 97, 244] (12520 is " " plus the first byte of the emoji);
    // a prefix ends mid-character.
    assert_eq!(
        t.decode_bytes(&[12520, 97]).unwrap(),
        vec![b' ', 0xF0, 0x9F, 0xA4]
    );
    assert_eq!(t.decode(&[12520, 97]).unwrap(), " \u{FFFD}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn encode_then_decode_is_identity(text in "\\PC*", ws in "[ \\t\\n\\r]{0,4}") {
        let text = format!("{ws}{text}{ws}");
        let g = Gpt2Tokenizer::new().unwrap();
        let b = ByteTokenizer::new();
        for t in [&g as &dyn Tokenizer, &b] {
            let ids = t.encode(&text);
            prop_assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
            prop_assert_eq!(t.decode(&ids).unwrap(), text.clone());
            let with_special = t.encode_with_special(&text);
            prop_assert_eq!(t.decode(&with_special).unwrap(), text.clone());
        }
    }

    #[test]
    fn special_markers_round_trip(parts in proptest::collection::vec("[a-zé ]{0,5}", 1..5)) {
        let text = parts.join("<|endoftext|>");
        for t in [&Gpt2Tokenizer::new().unwrap() as &dyn Tokenizer, &ByteTokenizer::new()] {
            let ids = t.encode_with_special(&text);
            let eos = ids.iter().filter(|&&i| i == t.eos_token_id()).count();
            prop_assert_eq!(eos, parts.len() - 1);
            prop_assert_eq!(t.decode(&ids).unwrap(), text.clone());
            prop_assert!(!t.encode(&text).contains(&t.eos_token_id()));
        }
    }
}
