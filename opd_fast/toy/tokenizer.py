"""The toy world's word-level tokenizer: one token per whitespace-separated word.

Built from a `tokenizers` WordLevel model with a whitespace-split pre-tokenizer and wrapped in
a `transformers.PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(dir)` loads it
offline. Encoding prepends <bos>; decoding joins words with single spaces.
"""

from __future__ import annotations

from opd_fast.toy.phrasing import filler_word, fillers_needed
from opd_fast.toy.spec import ToyWorldSpec

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
BOXED_OPEN, BOXED_CLOSE = "\\boxed{", "}"

# Words of the prompt, of both response patterns, and a few spare ones for later templates.
FORMAT_WORDS = (
    "what", "is", "plus", "?", ".", ":", "=", ";", "+", "so", BOXED_OPEN, BOXED_CLOSE,
    "question", "answer", "value", "of", "the", "recall", "then", "think", "step", "user",
    "assistant", "fact", "known", "unknown", "and", "because", "first", "final", "repeat",
)  # fmt: skip


def entity_name(index: int) -> str:
    """Token of entity `index`: e000, e001, ... (four digits past 999)."""
    return f"e{index:03d}" if index < 1000 else f"e{index:04d}"


def number_words(spec: ToyWorldSpec) -> list[str]:
    """Decimal numbers 0..max(99, largest sum) as single tokens."""
    largest = (spec.n_values - 1) + (spec.n_operands - 1)
    return [str(n) for n in range(max(99, largest) + 1)]


def vocabulary(spec: ToyWorldSpec) -> list[str]:
    """All tokens in id order: specials, numbers, format words, entities, then filler words
    (w000, w001, ...): the synonym sets' words, then unused ones up to `spec.min_vocab_size`."""
    words = list(SPECIAL_TOKENS) + number_words(spec) + list(FORMAT_WORDS)
    words += [entity_name(i) for i in range(spec.n_entities)]
    fillers = max(fillers_needed(spec), spec.min_vocab_size - len(words))
    words += [filler_word(i) for i in range(fillers)]
    if len(set(words)) != len(words):
        raise AssertionError("toy vocabulary has duplicate words")
    return words


def build_tokenizer(spec: ToyWorldSpec):
    """A PreTrainedTokenizerFast over `vocabulary(spec)` with <bos>/<eos>/<pad>/<unk> set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary(spec)
    vocab = {word: index for index, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=spec.student_arch.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
