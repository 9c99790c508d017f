"""Split runs (--num-jobs K --job-index i) merged equal a single-process run.

"Equal" means, precisely:
- the same documents in the same order: reading every document of every shard, in manifest order, gives the same
  sequence of token arrays (EOD included), compared with np.array_equal one by one;
- the same manifest totals (documents, tokens), tokenizer, dtype, skipped counts and sources;
- with `merge --reshard`, more: manifest.json and every shard file byte-identical to the single run's.
Without --reshard only the shard boundaries differ (each part starts a new shard), so checksums differ too.
"""

import json

import numpy as np

import pytest

from data_prep.errors import PrepareError
from data_prep.merge import merge_parts
from data_prep.sources import split_files
from megatron_mega.cli import main
from megatron_mega.data.manifest import Manifest

from .conftest import documents, tokenize, write_jsonl
from .test_tokenize import _same


def assert_same_dataset(merged, single):
    a, b = Manifest.load(str(merged)), Manifest.load(str(single))
    assert _same(documents(merged), documents(single))
    assert (a.documents, a.tokens, a.tokenizer, a.dtype, a.skipped, a.sources) == \
           (b.documents, b.tokens, b.tokenizer, b.dtype, b.skipped, b.sources)


@pytest.mark.parametrize("jobs", [3, 1, 8])
def test_split_files_is_a_contiguous_balanced_cover(jobs):
    sizes = [100, 5, 5, 300, 0, -1, 50, 50, 50, 1000]
    parts = [split_files([str(i) for i in range(len(sizes))], sizes, jobs, j) for j in range(jobs)]
    assert sum(parts, []) == list(range(len(sizes)))  # disjoint, complete, in order
    assert all(p == list(range(p[0], p[-1] + 1)) for p in parts if p)


def test_job_split_and_merge_equal_a_single_run(tmp_path, tokenizer_dir, corpus_docs, capsys):
    # files of very different sizes, bad records in some, an empty file
    chunks = [corpus_docs[:5], corpus_docs[5:30], corpus_docs[30:33], corpus_docs[33:70], corpus_docs[70:]]
    for i, chunk in enumerate(chunks):
        write_jsonl(tmp_path / "in" / f"{i}.jsonl", chunk)
    with open(tmp_path / "in" / "1.jsonl", "a") as fh:
        fh.write("{bad\n" + json.dumps({"text": ""}) + "\n")
    (tmp_path / "in" / "2b.jsonl").write_text("")
    single = tokenize(tmp_path / "single", tokenizer_dir, [tmp_path / "in"], shard_tokens=9000)
    out = tmp_path / "split"
    for job in range(3):
        argv = ["prepare", "tokenize", str(tmp_path / "in"), "--output", str(out), "--tokenizer", tokenizer_dir,
                "--shard-tokens", "9000", "--num-jobs", "3", "--job-index", str(job), "--workers", "1"]
        assert main(argv) == 0
        if job == 1:  # before the last part exists, merging is refused with the missing index
            assert main(["prepare", "merge", str(out)]) == 2
            assert "part(s) [2] of 3 are missing" in capsys.readouterr().err
    parts = [Manifest.load(str(out / f"part-{j:05d}-of-00003")) for j in range(3)]
    assert all(p.documents for p in parts)  # every job did some of the work
    assert main(["prepare", "merge", str(out)]) == 0
    assert "merged 3 part(s)" in capsys.readouterr().out
    assert_same_dataset(out, tmp_path / "single")
    Manifest.load(str(out)).verify()
    assert Manifest.load(str(out)).shards[0].prefix == "part-00000-of-00003/shard-00000"

    summary = merge_parts(str(out), reshard=True)
    assert summary.problems.counts == single.problems.counts
    assert summary.problems.examples == single.problems.examples
    assert (out / "manifest.json").read_bytes() == (tmp_path / "single" / "manifest.json").read_bytes()
    for shard in Manifest.load(str(out)).shards:
        for ext in (".bin", ".idx"):
            assert (out / f"{shard.prefix}{ext}").read_bytes() == (tmp_path / "single" / f"{shard.prefix}{ext}"
                                                                   ).read_bytes()


def test_dataset_rows_split_and_merge(tmp_path, tokenizer_dir, corpus_docs):
    import datasets

    datasets.Dataset.from_dict({"text": corpus_docs[:30] + [""]}).save_to_disk(str(tmp_path / "ds"))
    tokenize(tmp_path / "single", tokenizer_dir, hf_dataset=str(tmp_path / "ds"), shard_tokens=8000)
    for job in range(2):
        tokenize(tmp_path / "split", tokenizer_dir, hf_dataset=str(tmp_path / "ds"), shard_tokens=8000,
                 num_jobs=2, job_index=job)
    merge_parts(str(tmp_path / "split"))
    assert_same_dataset(tmp_path / "split", tmp_path / "single")


def test_merge_refuses_mixed_settings_and_unfinished_parts(tmp_path, tokenizer_dir, corpus_docs):
    write_jsonl(tmp_path / "in" / "a.jsonl", corpus_docs[:10])
    write_jsonl(tmp_path / "in" / "b.jsonl", corpus_docs[10:20])
    tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "in"], num_jobs=2, job_index=0, shard_tokens=5000)
    tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "in"], num_jobs=2, job_index=1, shard_tokens=6000)
    with pytest.raises(PrepareError, match="other settings.*shard_tokens"):
        merge_parts(str(tmp_path / "out"))
    (tmp_path / "out" / "part-00001-of-00002" / "manifest.json").unlink()
    with pytest.raises(PrepareError, match=r"part\(s\) \[1\] of 2 are not finished"):
        merge_parts(str(tmp_path / "out"))
    with pytest.raises(PrepareError, match="no part-NNNNN-of-KKKKK folders"):
        merge_parts(str(tmp_path / "in"))


def test_reshard_copies_runs_of_documents_as_the_one_by_one_rule_cuts(tmp_path, tokenizer_dir, corpus_docs,
                                                                        monkeypatch):
    """`merge --reshard` copies whole runs of documents per output shard (a binary search in the cumulative
    lengths) instead of one document at a time (11.8 us a document: 20 minutes per 100M). With shards smaller than
    many documents (oversized ones alone in a shard) and empty documents, the result is byte-identical to the
    single run and to the per-document path that Megatron files with several sequences a document still take."""
    from megatron_mega.data import indexed_dataset

    docs = corpus_docs[:40] + [""] * 3 + corpus_docs[40:60]
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:25])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[25:])
    tokenize(tmp_path / "single", tokenizer_dir, [tmp_path / "in"], shard_tokens=700)
    out = tmp_path / "split"
    for job in range(2):
        assert main(["prepare", "tokenize", str(tmp_path / "in"), "--output", str(out), "--tokenizer", tokenizer_dir,
                     "--shard-tokens", "700", "--num-jobs", "2", "--job-index", str(job), "--workers", "1"]) == 0
    lengths = [len(d) for d in documents(tmp_path / "single")]
    assert max(lengths) > 700 and sum(n > 700 for n in lengths) < len(lengths)  # oversized and fitting ones

    def resharded() -> dict[str, bytes]:
        merge_parts(str(out), reshard=True)
        files = {"manifest.json": (out / "manifest.json").read_bytes()}
        for shard in Manifest.load(str(out)).shards:
            for ext in (".bin", ".idx"):
                files[shard.prefix + ext] = (out / f"{shard.prefix}{ext}").read_bytes()
        return files

    fast = resharded()
    monkeypatch.setattr(indexed_dataset.IndexedDataset, "one_sequence_documents", lambda dataset: False)
    assert resharded() == fast
    single = {name: (tmp_path / "single" / name).read_bytes() for name in fast}
    assert fast == single and len(fast) > 7


def test_reshard_refuses_a_damaged_part_shard_by_name(tmp_path, tokenizer_dir, corpus_docs, capsys):
    """The run copy trusts a shard's lengths and its manifest's dtype, so both are checked first: a part whose
    shard holds another dtype than its manifest says, or whose index has a negative length, is one error naming
    the file (the copy wrote a manifest with wrong checksums, or copied the damage)."""
    from megatron_mega.data import indexed_dataset

    write_jsonl(tmp_path / "in" / "a.jsonl", corpus_docs[:20])
    write_jsonl(tmp_path / "in" / "b.jsonl", corpus_docs[20:40])
    out = tmp_path / "split"
    for job in range(2):
        assert main(["prepare", "tokenize", str(tmp_path / "in"), "--output", str(out), "--tokenizer", tokenizer_dir,
                     "--num-jobs", "2", "--job-index", str(job), "--workers", "1"]) == 0
    prefix = str(out / "part-00000-of-00002" / "shard-00000")
    original = indexed_dataset.IndexedDataset(prefix)
    lengths = np.asarray(original.sequence_lengths, dtype=np.int64)
    documents = np.array(original.document_indices, dtype=np.int64)  # a copy: the file is rewritten below
    tokens = np.concatenate([original[i] for i in range(len(original))]).astype(np.int32)
    del original
    (out / "part-00000-of-00002" / "shard-00000.bin").write_bytes(tokens.tobytes())
    indexed_dataset.write_index(prefix + ".idx", np.int32, lengths, documents)
    assert main(["prepare", "merge", str(out), "--reshard"]) == 2
    assert "shard-00000.idx: tokens of dtype int32, its manifest says uint16" in capsys.readouterr().err

    tokens = tokens.astype(np.uint16)
    (out / "part-00000-of-00002" / "shard-00000.bin").write_bytes(tokens.tobytes())
    damaged = lengths.copy()
    damaged[1], damaged[2] = -2, lengths[1] + lengths[2] + 2  # the lengths still sum to the token count
    indexed_dataset.write_index(prefix + ".idx", np.uint16, damaged, documents)
    assert main(["prepare", "merge", str(out), "--reshard"]) == 2
    assert "shard-00000.idx: sequence 1 (length -2" in capsys.readouterr().err
