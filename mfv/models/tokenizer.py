"""A word-level tokenizer built in code, for tiny models that cannot download one.

Every object name is a single token, so the first answer token identifies the object.
It has the special tokens OpenFlamingo expects (``<image>``, ``<|endofchunk|>``, a pad).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<PAD>", "<unk>", "<|endofchunk|>", "<image>", "<|endoftext|>")
PROMPT_WORDS = ("Q", "A", ":", ".", ",", "?", "the", "is", "of", "what")


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Builds a fast word-level tokenizer over ``words`` plus prompt punctuation.

    Args:
        words: Vocabulary words (object names); duplicates are ignored.

    Returns:
        A left-padding ``PreTrainedTokenizerFast`` whose vocabulary is stable for a
        given word list (special tokens first, then prompt words, then ``words`` sorted).
    """
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *PROMPT_WORDS, *sorted(set(words))):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Whitespace separates words and every punctuation mark is its own token.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<PAD>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|endofchunk|>", "<image>"],
    )
    tokenizer.padding_side = "left"
    return tokenizer


def prompt_words(words: Iterable[str] | None = None) -> list[str]:
    """The words of every mfv prompt: ``words`` (default: every object name) and the words of
    the chat prompts' system message, for word-level stand-in tokenizers."""
    from mfv.models.hf import SYSTEM_PROMPT
    from mfv.vocabulary import OBJECT_NAMES

    return [*(OBJECT_NAMES if words is None else words), *(w.strip(".,:'<>") for w in SYSTEM_PROMPT.split())]
