#!/usr/bin/env python3
"""Prints GPT-2 (r50k_base) token ids of the strings crates/model/tests/tokenizer.rs checks.

tiktoken downloads its rank files at run time, which this project's machines cannot, so the
encoding is rebuilt with tiktoken's own definition of r50k_base (pattern and special token from
tiktoken_ext.openai_public) from a local copy of the ranks, checked against the SHA-256 tiktoken
expects for the published r50k_base.tiktoken. openai-whisper's source package ships that file:

    python3 -m venv .tools/venv && .tools/venv/bin/pip install tiktoken
    .tools/venv/bin/pip download --no-deps --no-binary :all: openai-whisper -d .tools/dl
    tar xzf .tools/dl/openai_whisper-*.tar.gz -C .tools   # ships whisper/assets/gpt2.tiktoken
    .tools/venv/bin/python tools/gpt2_token_ids.py .tools/openai_whisper-*/whisper/assets/gpt2.tiktoken
"""
import json
import sys

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

# tiktoken_ext.openai_public.r50k_base()'s expected_hash for r50k_base.tiktoken.
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "It's we'll they've I'd you're",
    "tab\tnewline\nCRLF\r\n",
    "Numbers: 3.14159, 1,000,000 and 2024!",
    "naïve café — résumé",
    "日本語のテキスト",
    "emoji 🤖🚀 done",
    "def f(x):\n    return x ** 2  # square",
    "<|endoftext|>",
    "\n\nHuman: What is 2+2?\n\nAssistant: 4",
    "ends with spaces and newlines  \n\n",
]


def main() -> None:
    ranks = load_tiktoken_bpe(sys.argv[1], expected_hash=R50K_SHA256)
    enc = tiktoken.Encoding(
        name="r50k_base",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )
    for s in STRINGS:
        # encode_ordinary: special-token text is plain text, as Tokenizer::encode treats it.
        print(json.dumps(s, ensure_ascii=False), enc.encode_ordinary(s))
    print("special", enc.encode("a<|endoftext|>b", allowed_special="all"))


if __name__ == "__main__":
    main()
