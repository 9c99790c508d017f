"""`prepare inspect`: counts, histogram, decoded samples; verification catches a corrupted shard."""

import re

import pytest

from data_prep.inspect_dataset import inspect_dataset
from megatron_mega.cli import main
from megatron_mega.data.manifest import Manifest, ManifestError

from .conftest import tokenize, write_jsonl


@pytest.fixture()
def dataset(tmp_path, tokenizer_dir, corpus_docs):
    write_jsonl(tmp_path / "c.jsonl", corpus_docs + [""])
    tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"], shard_tokens=30000)
    return tmp_path / "out"


def test_inspect_reports_counts_histogram_and_samples(dataset, corpus_docs, capsys):
    assert main(["prepare", "inspect", str(dataset), "--samples", "2", "--sample-chars", "40"]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.load(str(dataset))
    assert "checksums: OK" in out
    assert f"{len(corpus_docs)} documents, {manifest.tokens:,} tokens, {len(manifest.shards)} shard(s)" in out
    assert "empty (empty document): 1" in out and "c.jsonl:80" in out
    assert "token histogram over all tokens" in out and "unk 0.00%" in out and "most frequent:" in out
    assert "document length (tokens, EOD included): min" in out
    first = corpus_docs[0][:40]
    assert f"ends with EOD: True): {first + '…'!r}" in out
    assert out.count("ends with EOD: True") == 2


def test_verification_catches_a_corrupted_shard(dataset, capsys):
    manifest = Manifest.load(str(dataset))
    victim = dataset / f"{manifest.shards[1].prefix}.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 1  # one bit, same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    manifest.verify(checksums=False)  # counts and sizes still agree
    with pytest.raises(ManifestError, match=f"^{re.escape(str(victim))}: sha256"):  # the file, with its folder
        manifest.verify()
    assert main(["prepare", "inspect", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-mega: error: {victim}: sha256") and err.count("\n") == 1
    assert main(["prepare", "inspect", str(dataset), "--no-verify"]) == 0  # still readable when asked not to check
    victim.write_bytes(bytes(data[:-2]))
    with pytest.raises(ManifestError, match="truncated|holds"):
        inspect_dataset(str(dataset))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tokenizer_dir, capsys):
    cases = [
        (["prepare", "inspect", str(tmp_path)], "no manifest"),
        (["prepare", "tokenize", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o"), "--tokenizer",
          tokenizer_dir], "none.jsonl (no such file)"),
        (["prepare", "tokenize", str(tmp_path), "--output", str(tmp_path / "o"), "--tokenizer",
          str(tmp_path / "missing")], "no tokenizer model"),
        (["prepare", "tokenize", "x.jsonl", "--output", str(tmp_path / "o"), "--tokenizer", tokenizer_dir,
          "--num-jobs", "2", "--job-index", "2"], "--job-index 2 must be in [0, --num-jobs 2)"),
        (["prepare", "tokenizer", str(tmp_path / "none.txt"), "--output", str(tmp_path / "t")],
         "none.txt (no such file)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("megatron-mega: error: ") and message in err and err.count("\n") == 1, err
