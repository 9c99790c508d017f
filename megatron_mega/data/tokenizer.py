"""The tokenizer used everywhere (data preparation, training, conversion, generation): a SentencePiece model.

A tokenizer folder holds

    tokenizer.model   the SentencePiece model (its sha256 identifies the tokenizer in dataset manifests)
    megatron_mega_tokenizer.json
                      {"format": "megatron_mega.tokenizer", "version": 1, "model_file": "tokenizer.model",
                       "sha256": ..., "vocab_size": ..., "bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3,
                       "mask_id": 4, "mask_token": "<mask>", "byte_fallback": true,
                       "training": {"model_type": "unigram", ...}}   # how it was trained (informational)

The special ids live in the model itself; the description repeats them so other tools need not parse the protobuf,
and loading checks the two agree. It is not called tokenizer.json: in a Hugging Face directory (a converted model
ships its tokenizer) that name is the `tokenizers` library's format, which transformers would try to parse. Folders
written before have ours under that name, and it is still read when its "format" says so; a Hugging Face
tokenizer.json beside a tokenizer.model is left alone.

The mask token is a SentencePiece *control* symbol: encoding text never produces it (a document that contains the
string "<mask>" stays ordinary text), only an MLM collator inserts it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Optional, Sequence

import sentencepiece as spm

from megatron_mega.atomic_io import atomic_write_text, atomic_write_with
from megatron_mega.json_file import load_json_object

FORMAT = "megatron_mega.tokenizer"
VERSION = 1
MODEL_FILE = "tokenizer.model"
INFO_FILE = "megatron_mega_tokenizer.json"
LEGACY_INFO_FILE = "tokenizer.json"  # the name before 2026-11-29, read when it holds our format
MASK_TOKEN = "<mask>"


class TokenizerError(ValueError):
    """A tokenizer file or folder that is missing, unreadable or inconsistent with its description."""


class Tokenizer:
    """A SentencePiece model plus its special ids. Picklable (it travels as the model's bytes)."""

    def __init__(self, model_proto: bytes, training: Optional[dict[str, Any]] = None, source: str = "<memory>"):
        self._proto = bytes(model_proto)
        self.source = source
        self.training = dict(training or {})
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError depending on the failure
            raise TokenizerError(f"{source}: not a SentencePiece model ({err})") from None
        self.sha256 = hashlib.sha256(self._proto).hexdigest()
        mask = self._sp.piece_to_id(MASK_TOKEN)
        # piece_to_id returns the unk id for an unknown piece
        self.mask_id: Optional[int] = mask if mask != self._sp.unk_id() else None

    # ---- loading and saving -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer folder (tokenizer.model [+ its description]) or a `.model` file."""
        path = os.fspath(path)
        info_path = None
        if os.path.isdir(path):
            model_path = os.path.join(path, MODEL_FILE)
            info_path = _info_path(path)
            if info_path is not None:
                info = _read_info(info_path)
                model_path = os.path.join(path, info.get("model_file", MODEL_FILE))
            else:
                info = None
        else:
            model_path, info = path, None
        if not os.path.exists(model_path):
            raise TokenizerError(f"{model_path}: no tokenizer model (train one with `megatron-mega prepare tokenizer`)")
        with open(model_path, "rb") as fh:
            proto = fh.read()
        tokenizer = cls(proto, training=(info or {}).get("training"), source=model_path)
        if info is not None:
            tokenizer._check_info(info, info_path)
        return tokenizer

    def _check_info(self, info: dict[str, Any], where: Optional[str]) -> None:
        expected = self.describe()
        for key in ("sha256", "vocab_size", "bos_id", "pad_id", "eos_id", "unk_id", "mask_id"):
            if key in info and info[key] != expected[key]:
                raise TokenizerError(f"{where}: {key} is {info[key]!r} but the model file has {expected[key]!r} "
                                     f"(the folder mixes two tokenizers)")

    def save(self, directory: str | os.PathLike) -> str:
        """Write tokenizer.model and its description into `directory` (atomically, model first)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)

        def write_model(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(self._proto)
                fh.flush()
                os.fsync(fh.fileno())

        atomic_write_with(os.path.join(directory, MODEL_FILE), write_model)
        atomic_write_text(os.path.join(directory, INFO_FILE), json.dumps(self.describe(), indent=2) + "\n")
        return directory

    def describe(self) -> dict[str, Any]:
        """The content of megatron_mega_tokenizer.json."""
        return {"format": FORMAT, "version": VERSION, "model_file": MODEL_FILE, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "pad_id": self.pad_id, "eos_id": self.eos_id,
                "unk_id": self.unk_id, "mask_id": self.mask_id,
                "mask_token": MASK_TOKEN if self.mask_id is not None else None,
                "byte_fallback": self.byte_fallback, "training": self.training}

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self._proto, "training": self.training, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], training=state["training"], source=state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…, source={self.source!r})"

    # ---- ids ----------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def byte_fallback(self) -> bool:
        """Whether unknown characters become UTF-8 byte pieces (so every text round-trips)."""
        first = self._sp.piece_to_id("<0x00>")
        return first != self._sp.unk_id() and self._sp.is_byte(first)

    @property
    def special_ids(self) -> dict[str, Optional[int]]:
        return {"bos_id": self.bos_id, "pad_id": self.pad_id, "eos_id": self.eos_id, "unk_id": self.unk_id,
                "mask_id": self.mask_id}

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def is_byte(self, token_id: int) -> bool:
        return self._sp.is_byte(int(token_id))

    def info(self):
        """The manifest's description of this tokenizer (`manifest.TokenizerInfo`)."""
        from megatron_mega.data.manifest import TokenizerInfo

        return TokenizerInfo(sha256=self.sha256, vocab_size=self.vocab_size, bos_id=self.bos_id, pad_id=self.pad_id,
                             eos_id=self.eos_id, unk_id=self.unk_id, mask_id=self.mask_id, model_file=MODEL_FILE)

    # ---- encoding -----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once (one C++ call; `num_threads` SentencePiece threads)."""
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids (bos, eos, pad, mask) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)


def _info_path(folder: str) -> Optional[str]:
    """Our description in `folder`: its current name, or the legacy tokenizer.json when that one is ours (not a
    Hugging Face `tokenizers` file)."""
    current = os.path.join(folder, INFO_FILE)
    if os.path.exists(current):
        return current
    legacy = os.path.join(folder, LEGACY_INFO_FILE)
    if os.path.exists(legacy):
        try:
            with open(legacy, encoding="utf-8") as fh:
                if json.load(fh).get("format") == FORMAT:
                    return legacy
        except (ValueError, AttributeError, UnicodeDecodeError):
            pass
    return None


def _read_info(path: str) -> dict[str, Any]:
    info = load_json_object(path, TokenizerError, "a megatron_mega tokenizer description")
    if info.get("format") != FORMAT:
        raise TokenizerError(f"{path}: not a megatron_mega tokenizer description (format {info.get('format')!r})")
    if info.get("version") != VERSION:
        raise TokenizerError(f"{path}: tokenizer description version {info.get('version')} is not supported")
    return info
