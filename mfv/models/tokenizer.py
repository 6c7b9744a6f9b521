"""Tokenizers built in code, for tiny models that cannot download one: word-level (OpenFlamingo
stand-ins) and byte-level BPE (the Hugging Face stand-ins, :func:`train_bpe_tokenizer`).

In the word-level one every object name is a single token, so the first answer token identifies
the object; it has the special tokens OpenFlamingo expects (``<image>``, ``<|endofchunk|>``, a pad).
"""

from __future__ import annotations

from typing import Iterable, Sequence

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


def first_tokens(answers: Iterable[str]) -> dict[str, str]:
    """Each answer's intended first token: its shortest prefix that starts no other answer, one
    character short of the whole word at most (so every answer of two or more characters is several
    tokens and no two answers share a first token, as the closed-set preflight requires)."""
    names = sorted(set(answers))
    prefixes = {}
    for name in names:
        others = [other for other in names if other != name]
        size = next((n for n in range(1, len(name)) if not any(o.startswith(name[:n]) for o in others)),
                    max(1, len(name) - 1))
        prefixes[name] = name[:size]
    return prefixes


def _merges(prefixes: dict[str, str], order: list[str]) -> list[tuple[str, str]]:
    """Each prefix joined left to right, the answers' merges in ``order``."""
    merges: list[tuple[str, str]] = []
    for name in order:
        prefix = prefixes[name]
        for end in range(2, len(prefix) + 1):
            if (prefix[: end - 1], prefix[end - 1]) not in merges:
                merges.append((prefix[: end - 1], prefix[end - 1]))
    return merges


def _byte_level(merges: list[tuple[str, str]], special_tokens: Sequence[str]) -> Tokenizer:
    vocab = {token: index for index, token in enumerate([*special_tokens, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return core


def train_bpe_tokenizer(answers: Iterable[str], special_tokens: Sequence[str]) -> Tokenizer:
    """A byte-level BPE tokenizer learnt in-process (no download), as the Hugging Face stand-ins use.

    Its merges join each answer's first token (:func:`first_tokens`) and nothing else: a few dozen
    merges, after which each answer is its first token and single bytes, so the first-token rule of
    the method runs as on the releases' tokenizers, and every other text is bytes and those pieces.
    The merges are ordered so that none splits another answer's first token (an answer whose
    prefix a later-learnt merge would cut is moved first).

    Args:
        answers: The stand-in's answer words (object names).
        special_tokens: Tokens never split (chat markers, image placeholders, BOS, pad).

    Returns:
        The ``tokenizers.Tokenizer`` (wrap it in the family's ``PreTrainedTokenizerFast`` class).

    Raises:
        ValueError: no order of merges gives every answer its own first token.
    """
    prefixes = first_tokens(answers)
    order = sorted(prefixes)
    for _ in range(len(order) ** 2 + 1):
        core = _byte_level(_merges(prefixes, order), special_tokens)
        wrong = [name for name in order if core.encode(name).tokens[0] != prefixes[name]]
        if not wrong:
            return core
        order.remove(wrong[0])
        order.insert(0, wrong[0])
    raise ValueError(f"no BPE merges give these answers their own first tokens: {wrong}")
