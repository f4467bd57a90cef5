"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the training split only.

The normalisation lives inside tokenizer.json, so the service tokenizes exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, MASK = "<pad>", "<unk>", "<mask>"
PAD_ID, UNK_ID, MASK_ID = 0, 1, 2  # MASK: masked-language pre-training and token dropout


def _normalizer() -> normalizers.Normalizer:
    # NFKC folds look-alike characters spammers use; runs of spaces and of blank lines carry
    # little meaning but cost many tokens, so they collapse. Case is kept (SHOUTING is a signal).
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(r"[\x00-\x08\x0b-\x1f\x7f]"), ""),
            normalizers.Replace(Regex(r"[ \t\f\v\u00a0]+"), " "),
            normalizers.Replace(Regex(r" ?\n[ \n]*"), "\n"),
        ]
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 16000, min_frequency: int = 2
) -> Tokenizer:
    """A new byte-level BPE with <pad>=0, <unk>=1 and <mask>=2, fitted to `texts`."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, UNK, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert (tok.token_to_id(PAD), tok.token_to_id(UNK), tok.token_to_id(MASK)) == (
        PAD_ID,
        UNK_ID,
        MASK_ID,
    )
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return Tokenizer.from_file(str(path))


def encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
