"""Tokenizing a corpus: contents, shard cutting, worker-count independence, every input format, refusals."""

import bz2
import csv
import gzip
import json
import lzma

import numpy as np
import pytest
import zstandard

from data_prep.errors import PrepareError
from megatron_mega.data.manifest import Manifest, ManifestError
from megatron_mega.data.tokenizer import Tokenizer

from .conftest import documents, tokenize, train, TrainSettings, tree, write_jsonl


def test_documents_round_trip_with_eod_and_verified_manifest(tmp_path, tokenizer_dir, corpus_docs):
    write_jsonl(tmp_path / "in" / "a.jsonl", corpus_docs[:40])
    write_jsonl(tmp_path / "in" / "b.jsonl", corpus_docs[40:])
    summary = tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "in"], shard_tokens=15000)
    tok = Tokenizer.load(tokenizer_dir)
    docs = documents(tmp_path / "out")
    assert [tok.decode(d) for d in docs] == corpus_docs
    assert all(d[-1] == tok.eos_id and d.dtype == np.uint16 for d in docs)
    manifest = Manifest.load(str(tmp_path / "out"))
    manifest.verify()
    assert manifest.tokenizer == tok.info() and manifest.dtype == "uint16"
    assert manifest.documents == summary.documents == len(corpus_docs)
    assert manifest.tokens == sum(map(len, docs)) == summary.tokens
    assert manifest.sources == [str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "b.jsonl")]
    assert manifest.skipped == {}
    assert Tokenizer.load(tmp_path / "out").sha256 == tok.sha256  # the tokenizer travels with the data


def test_shards_are_cut_by_the_token_budget_only(tmp_path, tokenizer_dir, corpus_docs):
    write_jsonl(tmp_path / "c.jsonl", corpus_docs)
    tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"], shard_tokens=5000)
    manifest = Manifest.load(str(tmp_path / "out"))
    lengths = [len(d) for d in documents(tmp_path / "out")]
    start = 0
    for shard, following in zip(manifest.shards, manifest.shards[1:] + [None]):
        in_shard = lengths[start:start + shard.documents]
        assert sum(in_shard) == shard.tokens
        assert shard.tokens <= 5000 or shard.documents == 1  # only a single oversized document exceeds it
        if following is not None:  # closed because the next document did not fit
            assert shard.tokens + lengths[start + shard.documents] > 5000
        start += shard.documents
    oversized = sum(n > 5000 for n in lengths)
    assert oversized > 0 and tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"],
                                      shard_tokens=5000).oversized == oversized


def test_output_is_byte_identical_for_any_worker_count(tmp_path, tokenizer_dir, corpus_docs):
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", corpus_docs[i::3] + ["", "  "])
    (tmp_path / "in" / "broken.jsonl").write_bytes(b'{"text": "ok"}\n{oops\n')
    trees = []
    for workers, batch_docs in ((1, 256), (2, 7)):  # batching is no part of the result either
        tokenize(tmp_path / f"w{workers}", tokenizer_dir, [tmp_path / "in"], shard_tokens=7000, workers=workers,
                 batch_docs=batch_docs)
        trees.append(tree(tmp_path / f"w{workers}"))
    assert trees[0] == trees[1]
    assert len([name for name in trees[0] if name.endswith(".bin")]) > 5
    assert Manifest.load(str(tmp_path / "w1")).skipped == {"empty": 6, "invalid_json": 1}


def _compressors():
    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def test_every_format_and_compression_gives_the_same_documents(tmp_path, tokenizer_dir, corpus_docs):
    docs = corpus_docs[:12]
    write_jsonl(tmp_path / "ref" / "c.jsonl", docs)
    tokenize(tmp_path / "ref_out", tokenizer_dir, [tmp_path / "ref"])
    expected = documents(tmp_path / "ref_out")
    lines = (tmp_path / "ref" / "c.jsonl").read_bytes()
    variants = {f"c.jsonl{suffix}": compress(lines) for suffix, compress in _compressors().items()}
    variants["c.json"] = json.dumps([{"text": d, "n": i} for i, d in enumerate(docs)], indent=1).encode()
    variants["lines-under-json-name.json"] = lines
    for name, data in variants.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(data)
        tokenize(tmp_path / f"out_{folder.name}", tokenizer_dir, [folder])
        assert _same(documents(tmp_path / f"out_{folder.name}"), expected), name
    # CSV (fields with newlines and quotes) and parquet with the text in a named column
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "body"])
        writer.writerows([i, d] for i, d in enumerate(docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), tmp_path / "c.parquet", row_group_size=5)
    for name in ("c.csv", "c.parquet"):
        tokenize(tmp_path / f"out_{name}", tokenizer_dir, [tmp_path / name], text_key="body")
        assert _same(documents(tmp_path / f"out_{name}"), expected), name


def test_txt_units(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    text = "First paragraph,\nline two.\n\n\nSecond paragraph.\n  \nThird.\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text)
    (tmp_path / "in" / "b.txt.gz").write_bytes(gzip.compress(b"another file"))
    expected = {"file": [text, "another file"],
                "paragraph": ["First paragraph,\nline two.", "Second paragraph.", "Third.", "another file"],
                "line": ["First paragraph,", "line two.", "Second paragraph.", "Third.", "another file"]}
    for unit, wanted in expected.items():
        tokenize(tmp_path / unit, tokenizer_dir, [tmp_path / "in"], txt_unit=unit)
        assert [tok.decode(d) for d in documents(tmp_path / unit)] == wanted


def test_globs_folders_and_order(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    for name, text in [("b/2.jsonl", "two"), ("b/10.jsonl", "ten"), ("a.jsonl", "a"), ("b/.hidden.jsonl", "no"),
                       ("b/notes.md", "no")]:
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"text": text}) + "\n")
    tokenize(tmp_path / "out", tokenizer_dir, [f"{tmp_path}/in/b/*.jsonl", tmp_path / "in", tmp_path / "in/a.jsonl"])
    # the glob first (sorted), then the folder (sorted, recursive, hidden files left out), each file once
    assert [tok.decode(d) for d in documents(tmp_path / "out")] == ["ten", "two", "a"]
    with pytest.raises(PrepareError, match="unsupported file type"):
        tokenize(tmp_path / "out2", tokenizer_dir, [tmp_path / "in" / "b" / "notes.md"])


def test_datasets_inputs(tmp_path, tokenizer_dir, corpus_docs, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # load_dataset's cache

    docs = corpus_docs[:10]
    write_jsonl(tmp_path / "c.jsonl", docs)
    tokenize(tmp_path / "ref", tokenizer_dir, [tmp_path / "c.jsonl"])
    expected = documents(tmp_path / "ref")
    datasets.Dataset.from_dict({"body": docs, "n": list(range(10))}).save_to_disk(str(tmp_path / "saved"))
    tokenize(tmp_path / "saved_out", tokenizer_dir, hf_dataset=str(tmp_path / "saved"), text_key="body")
    assert _same(documents(tmp_path / "saved_out"), expected)
    tokenize(tmp_path / "json_out", tokenizer_dir, hf_dataset="json", hf_data_files=[str(tmp_path / "c.jsonl")])
    assert _same(documents(tmp_path / "json_out"), expected)
    assert Manifest.load(str(tmp_path / "json_out")).sources[0].startswith("datasets:json[train]")
    with pytest.raises(PrepareError, match="no column 'text'.*body"):
        tokenize(tmp_path / "bad", tokenizer_dir, hf_dataset=str(tmp_path / "saved"))


def test_rerun_is_a_no_op_and_other_tokenizers_or_settings_are_refused(tmp_path, tokenizer_dir, corpus_docs):
    write_jsonl(tmp_path / "c.jsonl", corpus_docs[:20])
    tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"], shard_tokens=4000)
    before = tree(tmp_path / "out")
    again = tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"], shard_tokens=4000)
    assert again.already_complete and tree(tmp_path / "out") == before
    other = tmp_path / "other_tok"
    train(corpus_docs[:20], TrainSettings(vocab_size=600, model_type="bpe", threads=2)).save(other)
    with pytest.raises(ManifestError, match="prepared with tokenizer sha256 .* but the tokenizer given"):
        tokenize(tmp_path / "out", str(other), [tmp_path / "c.jsonl"], shard_tokens=4000)
    (tmp_path / "out" / "manifest.json").unlink()  # an unfinished run is protected the same way
    with pytest.raises(PrepareError, match="prepared with tokenizer sha256 .* but the tokenizer given"):
        tokenize(tmp_path / "out", str(other), [tmp_path / "c.jsonl"], shard_tokens=4000)
    with pytest.raises(PrepareError, match="shard_tokens differ"):
        tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"], shard_tokens=5000)
    with open(tmp_path / "c.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "appended later"}) + "\n")
    with pytest.raises(PrepareError, match=r"files differ \(e.g. .*c.jsonl: \d+ -> \d+ bytes\)"):
        tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"], shard_tokens=4000)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_folder_being_written_is_locked(tmp_path, tokenizer_dir, corpus_docs):
    from filelock import FileLock

    write_jsonl(tmp_path / "c.jsonl", corpus_docs[:3])
    (tmp_path / "out" / ".prepare").mkdir(parents=True)
    with FileLock(str(tmp_path / "out" / ".prepare" / "lock")):  # e.g. a duplicated SLURM task
        with pytest.raises(PrepareError, match="another process is writing this folder"):
            tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"])
    assert tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "c.jsonl"]).documents == 3


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_byte_order_marks_and_long_csv_cells(tmp_path, tokenizer_dir):
    """A UTF-8 byte-order mark opens no document in any format (before: the first JSON line was skipped as invalid,
    a JSON array was read as lines and lost elements, a .txt document began with U+FEFF), and a CSV cell over the
    csv module's 128 KiB default is read whole (before: the rest of the file was lost as one unreadable record)."""
    tok = Tokenizer.load(tokenizer_dir)
    bom = b"\xef\xbb\xbf"
    inputs = {"a.jsonl": bom + b'{"text": "first doc"}\n{"text": "second"}\n',
              "b.json": bom + b'[\n {"text": "x"},\n {"text": "y"}\n]\n',
              "c.txt": bom + b"Hello world",
              "d.csv": bom + b"text\nhello\n"}
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    for unit in ("file", "line", "paragraph"):
        out = tmp_path / f"out-{unit}"
        tokenize(out, tokenizer_dir, [tmp_path / n for n in inputs], txt_unit=unit)
        assert [tok.decode(d) for d in documents(out)] == ["first doc", "second", "x", "y", "Hello world", "hello"]
        assert not Manifest.load(str(out)).skipped
    long = "word " * 40_000  # 200,000 characters in one cell
    with open(tmp_path / "long.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["text"], [long], ["after"]])
    tokenize(tmp_path / "out-long", tokenizer_dir, [tmp_path / "long.csv"])
    decoded = [tok.decode(d) for d in documents(tmp_path / "out-long")]
    assert len(decoded) == 2 and decoded[0].split() == long.split() and decoded[1] == "after"


def test_the_shard_cutter_writes_runs_of_documents_as_it_wrote_one_at_a_time(tmp_path):
    """The main process hands the cutter each run of documents between skipped records at once (one write and hash
    update per shard share; the per-document path capped the pool near 170k documents/s). Shards, their records
    (cursor, the skipped records each shard tallies, oversized count) must be what one document at a time gives:
    batches with skipped records inside, oversized and empty documents, cuts inside and across batches."""
    from data_prep import tokenize as T

    class Source:
        def location(self, number):
            return f"in.jsonl:{number}"

    class Bar:
        def update(self, n):
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

    rng = np.random.default_rng(3)
    batches, number = [], 0
    for _ in range(12):
        outcomes, lengths = [], []
        for _ in range(int(rng.integers(1, 30))):
            number += 1
            if rng.random() < 0.15:
                outcomes.append((0, number, "empty", "no text", 1))
                continue
            outcomes.append((0, number, None, "", 0))
            lengths.append(int(rng.choice([0, 3, 40, 90, 150, 400])))
        lengths = np.asarray(lengths, dtype=np.int64)
        batches.append((outcomes, lengths, rng.integers(0, 1000, int(lengths.sum())).astype(np.uint16)))

    def cut(folder, one_at_a_time):
        out = tmp_path / folder
        (out / T.STATE_DIR).mkdir(parents=True)
        cutter = T.ShardCutter(str(out), np.uint16, 200, T._Resume([], None, T.Problems(), 0))
        if one_at_a_time:
            run = cutter.add_run
            cutter.add_run = lambda tokens, lengths, positions: [
                run(tokens[int(lengths[:i].sum()):int(lengths[:i + 1].sum())], lengths[i:i + 1], positions[i:i + 1])
                for i in range(len(lengths))]
        problems = T._write(iter(batches), [Source()], cutter, False, Bar())
        files = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        return files, problems.to_dict(), cutter.oversized

    runs, single = cut("runs", False), cut("single", True)
    assert runs == single
    assert sum(name.endswith(".bin") for name in runs[0]) > 5 and runs[2] > 0
