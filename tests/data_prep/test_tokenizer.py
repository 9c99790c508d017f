"""The tokenizer: special ids, exact round trip on a real corpus, determinism, save/load, clear errors."""

import hashlib
import json
import pickle

import pytest

from data_prep.errors import PrepareError
from data_prep.train_tokenizer import TrainSettings, sample_documents, sentences, train
from data_prep.sources import FileSource
from megatron_mega.cli import main
from megatron_mega.data.tokenizer import Tokenizer, TokenizerError

from .conftest import write_jsonl


def test_special_ids_and_description(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert tok.special_ids == {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4}
    assert [tok.id_to_piece(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tok.vocab_size == 2000 and tok.byte_fallback
    info = json.load(open(f"{tokenizer_dir}/megatron_mega_tokenizer.json"))
    assert info["sha256"] == hashlib.sha256(open(f"{tokenizer_dir}/tokenizer.model", "rb").read()).hexdigest()
    assert info["sha256"] == tok.sha256 and info["vocab_size"] == 2000 and info["mask_id"] == 4
    assert Tokenizer.load(f"{tokenizer_dir}/tokenizer.model").sha256 == tok.sha256  # a bare .model file loads too


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_round_trip_every_document(corpus_docs, tokenizer_dir, model_type):
    tok = Tokenizer.load(tokenizer_dir) if model_type == "unigram" else train(
        corpus_docs, TrainSettings(vocab_size=1000, model_type="bpe", threads=2))
    batch = tok.encode_batch(corpus_docs)
    for doc, ids in zip(corpus_docs, batch):
        assert ids == tok.encode(doc)
        assert tok.decode(ids) == doc
    assert tok.decode_batch(batch[:3]) == corpus_docs[:3]
    # whitespace, control characters, characters never seen in training (bytes), and the mask string as plain text
    for text in [" lead", "\n\nx", "tab\there  ", "é😀\x00z", "<mask> stays text", "a\r\nb"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.mask_id not in ids
    assert tok.encode("x", add_bos=True, add_eos=True)[0] == 0 and tok.encode("x", add_eos=True)[-1] == 2


def test_training_is_deterministic(corpus_docs, tokenizer_dir):
    again = train(corpus_docs, TrainSettings(vocab_size=2000, threads=2))  # the fixture's settings
    assert again.model_proto == Tokenizer.load(tokenizer_dir).model_proto


def test_sampling_is_seeded_and_in_corpus_order(tmp_path, corpus_docs):
    path = write_jsonl(tmp_path / "c.jsonl", corpus_docs)
    sources = [FileSource(str(path))]
    a, _, seen = sample_documents(sources, "text", 20, seed=1)
    b, _, _ = sample_documents(sources, "text", 20, seed=1)
    c, _, _ = sample_documents(sources, "text", 20, seed=2)
    assert seen == len(corpus_docs) and a == b and a != c and len(a) == 20
    assert [corpus_docs.index(d) for d in a] == sorted(corpus_docs.index(d) for d in a)
    everything, _, _ = sample_documents(sources, "text", 1000, seed=0)
    assert everything == corpus_docs


def test_sentences_keep_newlines_and_bound_length():
    doc = "short line\n" + "x" * 25 + "\nend"
    pieces = list(sentences([doc], max_chars=10))
    assert "".join(pieces) == doc and max(map(len, pieces)) <= 10


def test_save_pickle_and_mismatched_description(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.sha256 == tok.sha256 and copy.encode("hello world") == tok.encode("hello world")
    tok.save(tmp_path / "copy")
    assert Tokenizer.load(tmp_path / "copy").sha256 == tok.sha256
    info = json.load(open(tmp_path / "copy" / "megatron_mega_tokenizer.json"))
    info["eos_id"] = 7
    (tmp_path / "copy" / "megatron_mega_tokenizer.json").write_text(json.dumps(info))
    with pytest.raises(TokenizerError, match="eos_id"):
        Tokenizer.load(tmp_path / "copy")
    with pytest.raises(TokenizerError, match="no tokenizer model"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_bad_training_settings(corpus_docs):
    with pytest.raises(PrepareError, match="too small"):
        train(corpus_docs, TrainSettings(vocab_size=200))
    with pytest.raises(PrepareError, match="SentencePiece training failed.*[Vv]ocabulary size"):
        train(corpus_docs[:2], TrainSettings(vocab_size=30000, threads=2))


def test_cli_trains_and_refuses_to_replace_a_different_tokenizer(tmp_path, corpus_docs, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", corpus_docs[:40])
    args = ["prepare", "tokenizer", str(path), "--output", str(tmp_path / "tok"), "--vocab-size", "500",
            "--threads", "2", "--model-type", "bpe", "--sample-docs", "30"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "decode(encode(doc)) == doc for 30/30" in out and "'mask_id': 4" in out
    assert main(args) == 0  # same inputs and settings: the same tokenizer, accepted
    capsys.readouterr()
    assert main(args[:-1] + ["31"]) == 2
    assert "a different tokenizer is already there" in capsys.readouterr().err
    assert main(args[:-1] + ["31", "--overwrite"]) == 0


def test_the_description_does_not_take_hugging_faces_tokenizer_json(tmp_path, tokenizer_dir):
    """Ours was named tokenizer.json, which transformers parses as a `tokenizers` file in a converted model's
    folder (KeyError: 'added_tokens'); a real Hugging Face tokenizer.json made our loader refuse the folder. Folders
    written before still load: a tokenizer.json in our format is read."""
    tok = Tokenizer.load(tokenizer_dir)
    tok.save(tmp_path / "new")
    assert not (tmp_path / "new" / "tokenizer.json").exists()
    (tmp_path / "new" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {}}))
    assert Tokenizer.load(tmp_path / "new").sha256 == tok.sha256  # a Hugging Face file beside it is left alone
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.model").write_bytes((tmp_path / "new" / "tokenizer.model").read_bytes())
    info = json.load(open(tmp_path / "new" / "megatron_mega_tokenizer.json"))
    info["eos_id"] = 9
    (old / "tokenizer.json").write_text(json.dumps(info))  # the legacy name, our format: read and checked
    with pytest.raises(TokenizerError, match="eos_id"):
        Tokenizer.load(old)
