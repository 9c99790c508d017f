"""Resume: a run killed (really, SIGKILL) or crashed mid-way, rerun, gives the bytes of an uninterrupted run."""

import json
import os
import signal
import multiprocessing
import time

import pytest

from data_prep import tokenize as tokenize_module
from megatron_mega.cli import main
from megatron_mega.data.manifest import Manifest

from .conftest import tokenize, tree


def corpus_with_bad_lines(folder, docs, copies):
    """`copies` passes over `docs` in three files, a bad record after every 7th document (so skipped records fall
    between shard boundaries and the tally has to be resumed exactly)."""
    folder.mkdir()
    for part in range(3):
        with open(folder / f"part{part}.jsonl", "w") as fh:
            for copy in range(copies):
                for i, doc in enumerate(docs[part::3]):
                    fh.write(json.dumps({"text": doc, "copy": copy}) + "\n")
                    if i % 7 == 0:
                        fh.write('{"text": broken\n' if i % 2 else json.dumps({"text": ""}) + "\n")
    return folder


def _run_cli_in_own_group(argv):
    os.setsid()  # a process group of its own: the kill takes its workers too, like a node that dies
    os._exit(main(argv))


def test_resume_after_sigkill_is_byte_identical(tmp_path, tokenizer_dir, corpus_docs):
    inputs = corpus_with_bad_lines(tmp_path / "in", corpus_docs, copies=6)
    tokenize(tmp_path / "reference", tokenizer_dir, [inputs], shard_tokens=20000, workers=2)
    reference = tree(tmp_path / "reference")
    out = tmp_path / "out"
    argv = ["prepare", "tokenize", str(inputs), "--output", str(out), "--tokenizer", tokenizer_dir,
            "--shard-tokens", "20000", "--workers", "2", "--no-progress"]
    # a forked process runs the command line (a fresh interpreter would spend seconds importing torch first)
    process = multiprocessing.get_context("fork").Process(target=_run_cli_in_own_group, args=(argv,))
    process.start()
    first = out / ".prepare" / "shard-00000.json"
    deadline = time.monotonic() + 60
    while not first.exists() and process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.killpg(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    finished = len([n for n in os.listdir(out / ".prepare") if n.startswith("shard-")])
    assert 1 <= finished < len(Manifest.load(str(tmp_path / "reference")).shards)

    summary = tokenize(out, tokenizer_dir, [inputs], shard_tokens=20000, workers=1)
    assert summary.resumed_shards == finished
    assert tree(out) == reference


@pytest.mark.parametrize("damage", ["records_lost", "crash_mid_shard"])
def test_resume_from_every_kind_of_leftover(tmp_path, tokenizer_dir, corpus_docs, monkeypatch, damage):
    inputs = corpus_with_bad_lines(tmp_path / "in", corpus_docs, copies=1)
    tokenize(tmp_path / "reference", tokenizer_dir, [inputs], shard_tokens=6000)
    reference = tree(tmp_path / "reference")
    out = tmp_path / "out"
    if damage == "records_lost":
        # killed after shard 4's pair was renamed into place but before its record: the pair must not count; later
        # pairs are stale; a temporary of another process and a truncated .bin lie around
        tokenize(out, tokenizer_dir, [inputs], shard_tokens=6000)
        for name in ("manifest.json", ".prepare/summary.json"):
            os.remove(out / name)
        for path in out.glob(".prepare/shard-*.json"):
            if int(path.stem.split("-")[1]) >= 4:
                path.unlink()
        (out / "shard-00004.bin.tmp-99999").write_bytes(b"partial")
        # atomic writes a SIGKILL cut short: a shard's record and the manifest, never renamed into place
        (out / ".prepare" / ".shard-00004.json.x1y2z3_a.tmp").write_text('{"shard": {')
        (out / ".manifest.json.q9w8e7r6.tmp").write_text("{")
        with open(out / "shard-00002.bin", "r+b") as fh:  # a recorded shard with a wrong size is redone too
            fh.truncate(10)
    else:
        calls = {"n": 0}
        close = tokenize_module.ShardCutter._close

        def crash_on_fifth(self):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("simulated crash")
            close(self)

        monkeypatch.setattr(tokenize_module.ShardCutter, "_close", crash_on_fifth)
        with pytest.raises(RuntimeError, match="simulated crash"):
            tokenize(out, tokenizer_dir, [inputs], shard_tokens=6000, workers=2)
        monkeypatch.setattr(tokenize_module.ShardCutter, "_close", close)
        assert not [n for n in os.listdir(out) if ".tmp" in n]  # the aborted shard left no temporaries
    summary = tokenize(out, tokenizer_dir, [inputs], shard_tokens=6000)
    assert summary.resumed_shards == (2 if damage == "records_lost" else 4)
    assert tree(out) == reference
    assert summary.problems.counts == Manifest.load(str(out)).skipped == {"empty": 6, "invalid_json": 6}
