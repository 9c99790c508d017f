"""Train a SentencePiece tokenizer (unigram or BPE) on a sample of the corpus.

Ids follow MegaConfig's defaults: bos 0 (`<s>`), pad 1 (`<pad>`), eos 2 (`</s>`), unk 3 (`<unk>`), then the MLM mask
`<mask>` (4, a control symbol: text never encodes to it), then (with byte fallback) the 256 byte pieces.

Settings chosen so that decode(encode(text)) == text for every text when byte fallback is on: no normalisation
(`identity`), whitespace kept as is (runs of spaces, tabs, newlines), digits split one by one.

Deterministic: the same inputs, seed, and settings (including `threads`: SentencePiece's result depends on how many
threads share the work, so it is a setting, never the machine's core count) give a byte-identical tokenizer.model.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from data_prep.errors import PrepareError
from data_prep.records import SKIP, Problems, record_text
from data_prep.sources import iter_items
from megatron_mega.data.tokenizer import MASK_TOKEN, Tokenizer


@dataclass
class TrainSettings:
    vocab_size: int = 32000
    model_type: str = "unigram"  # or "bpe"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    sample_docs: int = 100_000
    seed: int = 0
    threads: int = 8
    max_sentence_chars: int = 4096  # documents are fed in line-aligned pieces of at most this many characters


def sample_documents(sources: list, text_key: str, count: int, seed: int) -> tuple[list[str], Problems, int]:
    """A uniform sample of `count` documents (reservoir sampling with `seed`), in corpus order.

    Returns (documents, skipped records, documents seen). Reads every input once; documents are checked exactly as
    `prepare tokenize` checks them, so bad records are skipped and counted here too."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    problems = Problems()
    seen = 0
    for index, number, kind, payload in iter_items(sources):
        text, reason, detail = record_text(kind, payload, text_key)
        if text is None:
            problems.add(reason, sources[index].location(number), detail, payload[2] if kind == SKIP else 1)
            continue
        if len(reservoir) < count:
            reservoir.append((seen, text))
        else:
            slot = rng.randrange(seen + 1)
            if slot < count:
                reservoir[slot] = (seen, text)
        seen += 1
    reservoir.sort(key=lambda pair: pair[0])
    return [text for _, text in reservoir], problems, seen


def sentences(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Pieces of documents for SentencePiece, cut after newlines so no piece exceeds `max_chars` (a longer line is cut
    hard). Newlines stay inside the pieces, so the tokenizer learns them as ordinary characters."""
    for document in documents:
        piece = ""
        for line in document.splitlines(keepends=True):
            while len(line) > max_chars:
                if piece:
                    yield piece
                    piece = ""
                yield line[:max_chars]
                line = line[max_chars:]
            if piece and len(piece) + len(line) > max_chars:
                yield piece
                piece = ""
            piece += line
        if piece:
            yield piece


def train(documents: list[str], settings: TrainSettings, extra: Optional[dict] = None) -> Tokenizer:
    """Train on `documents`; `extra` goes into the tokenizer description's "training" record."""
    if settings.model_type not in ("unigram", "bpe"):
        raise PrepareError(f"model type {settings.model_type!r}: choose unigram or bpe")
    minimum = 5 + (256 if settings.byte_fallback else 0)
    if settings.vocab_size <= minimum:
        raise PrepareError(f"--vocab-size {settings.vocab_size} is too small: the special tokens"
                           f"{' and 256 byte pieces' if settings.byte_fallback else ''} alone take {minimum}")
    if not documents:
        raise PrepareError("no usable documents to train the tokenizer on"
                           + (f" ({extra['why_none']})" if extra and extra.get("why_none") else ""))
    if not 0 < settings.character_coverage <= 1:
        raise PrepareError(f"--character-coverage {settings.character_coverage} must be in (0, 1]")
    spm.set_random_generator_seed(settings.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(documents, settings.max_sentence_chars), model_writer=model,
            model_type=settings.model_type, vocab_size=settings.vocab_size,
            character_coverage=settings.character_coverage, byte_fallback=settings.byte_fallback,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3, bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>",
            unk_piece="<unk>", control_symbols=[MASK_TOKEN],
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            split_digits=True, allow_whitespace_only_pieces=True,
            input_sentence_size=0, shuffle_input_sentence=False,  # we sampled already; use every piece, in order
            max_sentence_length=4 * settings.max_sentence_chars,  # bytes
            num_threads=settings.threads, minloglevel=2)
    except RuntimeError as err:
        message = str(err).split("] ", 1)[-1].strip()
        # SentencePiece names its own flags (--character_coverage); the command's are spelt with hyphens
        message = re.sub(r"--(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)
        raise PrepareError(f"SentencePiece training failed: {message}") from None
    training = {"model_type": settings.model_type, "vocab_size": settings.vocab_size,
                "character_coverage": settings.character_coverage, "byte_fallback": settings.byte_fallback,
                "sample_docs": settings.sample_docs, "seed": settings.seed, "threads": settings.threads,
                "max_sentence_chars": settings.max_sentence_chars, "sentencepiece": spm.__version__,
                **(extra or {})}
    return Tokenizer(model.getvalue(), training=training)
