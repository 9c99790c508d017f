"""Bad input is counted and located (file:line), never a crash; --strict stops at the first with a clear error."""

import gzip
import json
import os

import pytest

from data_prep.errors import PrepareError
from megatron_mega.cli import main
from megatron_mega.data.manifest import Manifest
from megatron_mega.data.tokenizer import Tokenizer

from .conftest import documents, tokenize, write_jsonl

GOOD = ["first good document", "second good document", "third good document", "fourth good document"]


def bad_corpus(folder):
    folder.mkdir()
    lines = [
        json.dumps({"text": GOOD[0]}),                 # 1
        '{"text": "unterminated',                      # 2 malformed JSON
        json.dumps({"title": "no text here"}),         # 3 no text key
        json.dumps({"text": ""}),                      # 4 empty
        json.dumps({"text": " \n\t "}),                # 5 whitespace only
        "",                                            # 6 blank line: not a record
        json.dumps({"text": 42}),                      # 7 not a string
        json.dumps(["a", "list"]),                     # 8 not an object
        json.dumps({"text": None}),                    # 9 null
        '{"text": "lone \\ud800 surrogate"}',          # 10 invalid text (a JSON escape of half a pair)
        json.dumps({"text": GOOD[1]}),                 # 11
    ]
    data = "\n".join(lines).encode() + b'\n{"text": "caf\xe9 in latin-1"}\n' + json.dumps({"text": GOOD[2]}).encode()
    (folder / "a.jsonl").write_bytes(data)            # line 12 invalid UTF-8, line 13 good, no final newline
    (folder / "b_empty.jsonl").write_bytes(b"")
    good = gzip.compress(json.dumps({"text": GOOD[3]}).encode() + b"\n" + json.dumps({"text": "lost"}).encode())
    (folder / "c_truncated.jsonl.gz").write_bytes(good[: len(good) - 12])  # corrupt: the stream ends early
    (folder / "d.txt").write_bytes(b"ok text\nbad \xff byte on line 2\n")
    (folder / "e.csv").write_bytes(b"id,text\n1,\xfe\xfe\n2,\n")
    return [folder]


def test_every_bad_record_is_counted_with_its_location(tmp_path, tokenizer_dir):
    inputs = bad_corpus(tmp_path / "in")
    summary = tokenize(tmp_path / "out", tokenizer_dir, inputs)
    a, b, c, d, e = (str(tmp_path / "in" / n) for n in ("a.jsonl", "b_empty.jsonl", "c_truncated.jsonl.gz",
                                                         "d.txt", "e.csv"))
    expected = {"invalid_json": 1, "missing_key": 2, "empty": 3, "not_text": 1, "not_object": 1,
                "invalid_utf8": 4, "empty_file": 1, "unreadable": 1}
    assert Manifest.load(str(tmp_path / "out")).skipped == expected == summary.problems.counts
    examples = summary.problems.examples
    assert examples["invalid_json"] == [f"{a}:2: Unterminated string starting at (column 10)"]
    assert examples["missing_key"][0] == f"{a}:3: no 'text' field (fields: title)"
    assert examples["missing_key"][1] == f"{a}:9: 'text' is null"
    assert [x.split(": ")[0] for x in examples["empty"]] == [f"{a}:4", f"{a}:5", f"{e}:3"]
    assert examples["not_text"] == [f"{a}:7: 'text' is a int, not a string"]
    assert examples["not_object"] == [f"{a}:8: a JSON list, not an object"]
    assert examples["invalid_utf8"] == [f"{a}:10: lone surrogate U+D800 at character 6",
                                        f"{a}:12: byte 0xe9 at column 14",
                                        f"{d}: byte 0xff at line 2, column 5",
                                        f"{e}:2: lone surrogate U+DCFE at character 1"]
    assert examples["empty_file"] == [f"{b}: no records"]
    assert examples["unreadable"][0].startswith(f"{c}:2: EOFError: Compressed file ended")  # line 1 was read
    tok = Tokenizer.load(tokenizer_dir)
    assert [tok.decode(x) for x in documents(tmp_path / "out")] == GOOD  # the gzip lost only its unreadable end
    report = "\n".join(summary.lines())
    assert "skipped 14 record(s)" in report and f"{a}:2" in report


@pytest.mark.parametrize("reason, where", [("invalid_json", "a.jsonl:2"), ("unreadable", "c_truncated.jsonl.gz:2")])
def test_strict_stops_with_file_and_line_and_leaves_nothing_half_written(tmp_path, tokenizer_dir, capsys, reason,
                                                                         where):
    inputs = bad_corpus(tmp_path / "in")
    if reason == "unreadable":
        inputs = [tmp_path / "in" / "a.jsonl.missing", tmp_path / "in"]  # (unsupported name: refused up front)
        with pytest.raises(PrepareError, match="unsupported file type"):
            tokenize(tmp_path / "out", tokenizer_dir, inputs, strict=True)
        inputs = [tmp_path / "in" / "c_truncated.jsonl.gz", tmp_path / "in"]
    code = main(["prepare", "tokenize", *map(str, inputs), "--output", str(tmp_path / "out"), "--tokenizer",
                 tokenizer_dir, "--strict", "--workers", "2", "--shard-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("megatron-mega: error: ")
    assert where in err and "--strict" in err
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    names = os.listdir(out)
    assert not [n for n in names if ".tmp" in n]
    # whatever shards exist are finished ones (their record written), so a rerun without --strict resumes from them
    for name in names:
        if name.endswith(".bin"):
            assert (out / ".prepare" / name.replace(".bin", ".json")).exists()
    assert main(["prepare", "tokenize", *map(str, inputs), "--output", str(out), "--tokenizer", tokenizer_dir,
                 "--shard-tokens", "4", "--no-progress"]) == 0
    assert "skipped 14 record(s)" in capsys.readouterr().out


def test_parquet_without_the_column_and_json_array_errors(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"body": ["x", "y", "z"]}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.json").write_text('[{"text": "fine"},\n {"text": ]')
    (tmp_path / "in" / "c.parquet").write_bytes(b"PAR1 not really")
    summary = tokenize(tmp_path / "out", tokenizer_dir, [tmp_path / "in"])
    assert summary.problems.counts == {"missing_key": 3, "invalid_json": 1, "unreadable": 1}
    assert summary.problems.examples["missing_key"][0].startswith(f"{tmp_path / 'in' / 'a.parquet'}:row 1: no 'text'")
    assert summary.problems.examples["invalid_json"][0].endswith(
        "b.json: Expecting value (line 2, column 11); the whole file is skipped")
    assert summary.documents == 0 and Manifest.load(str(tmp_path / "out")).shards == []


def test_missing_inputs_are_refused_before_anything_is_written(tmp_path, tokenizer_dir, capsys):
    """A typo'd file or a glob matching nothing used to be one "unreadable" record in a run that exited 0."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    for missing, message in ((tmp_path / "nope.jsonl", "nope.jsonl (no such file)"),
                             (f"{tmp_path}/*.parquet", "*.parquet (matches no supported file)")):
        for step in (["tokenize", "--tokenizer", tokenizer_dir], ["tokenizer", "--vocab-size", "300"]):
            code = main(["prepare", step[0], str(tmp_path / "a.jsonl"), str(missing), "--output",
                         str(tmp_path / "out"), *step[1:]])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith("megatron-mega: error: input ") and message in err, err
            assert not (tmp_path / "out").exists()


def test_no_usable_document_is_an_error_that_leaves_nothing(tmp_path, tokenizer_dir, capsys):
    """Every record skipped (here: the text is in another column) gave an empty dataset and exit 0; a corrected
    rerun then collided with the empty run's settings."""
    (tmp_path / "c.csv").write_text("id,content\n1,hello\n2,world\n")
    args = ["prepare", "tokenize", str(tmp_path / "c.csv"), "--output", str(tmp_path / "out"), "--tokenizer",
            tokenizer_dir, "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no document was kept from the inputs (2 record(s) skipped, missing_key: 2; e.g. " in err
    assert "no 'text' column (columns: id, content)" in err and not (tmp_path / "out").exists()
    assert main([*args, "--text-key", "content"]) == 0
    assert main(["prepare", "tokenizer", str(tmp_path / "c.csv"), "--output", str(tmp_path / "tok"),
                 "--vocab-size", "300"]) == 2
    assert "no usable documents to train the tokenizer on (2 record(s) skipped, missing_key: 2" in \
        capsys.readouterr().err


def test_a_strict_stop_keeps_the_shards_closed_before_the_bad_record(tmp_path, tokenizer_dir, capsys):
    """Documents of the same batch before the bad record are written first: the shards they close are finished
    (as when documents were written one at a time) and a rerun resumes after them."""
    write_jsonl(tmp_path / "in" / "a.jsonl", [f"document number {i} with some words" for i in range(10)])
    with open(tmp_path / "in" / "a.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"text": 3}\n')
    out = tmp_path / "out"
    assert main(["prepare", "tokenize", str(tmp_path / "in"), "--output", str(out), "--tokenizer", tokenizer_dir,
                 "--strict", "--workers", "1", "--shard-tokens", "4"]) == 2
    assert "a.jsonl:11: text field is not a string" in capsys.readouterr().err
    # one document a shard: the first nine are closed; the tenth was still open when the run stopped
    assert sorted(p.name for p in (out / ".prepare").glob("shard-*.json")) == [f"shard-{i:05d}.json" for i in range(9)]
