"""The quickstart's phases at a reduced size (tiny model, 12 steps, a 300k-character corpus): every phase runs,
the converted checkpoint loads into all six heads, and a rerun skips everything instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quickstart(run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch.quickstart", "--run-dir", str(run_dir), "--steps", "12",
                           "--max-corpus-chars", "300000", "--config", os.path.join(ROOT, "configs/train/tiny.yaml"),
                           "--new-tokens", "8", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_quickstart_reduced_then_rerun_skips(tmp_path):
    run_dir = tmp_path / "qs"
    first = _quickstart(run_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((run_dir / "quickstart.json").read_text())
    assert state["corpus"]["documents"] > 10
    assert state["tokenize"]["tokens"] > 50_000
    assert state["train"]["steps"] == 12 and state["train"]["tokens_per_s"] > 0
    step, loss = state["train"]["valid"]
    assert step == 12 and 0 < loss < 9
    names = [row[0] for row in state["heads"]["heads"]]
    assert names == ["MegaForCausalLM", "MegaForMaskedLM", "MegaForSequenceClassification", "MegaForMultipleChoice",
                     "MegaForTokenClassification", "MegaForQuestionAnswering"]
    assert all(row[1] > 0 for row in state["heads"]["heads"])   # every head loaded trained tensors
    assert state["heads"]["heads"][0][2] == 0                    # the causal LM: nothing newly initialised
    assert os.path.isdir(run_dir / "checkpoints" / "step00000012")
    assert "=== summary" in first.stdout and "perplexity" in first.stdout
    assert "torch.distributed.run --nproc_per_node=2 --standalone" in first.stdout

    again = _quickstart(run_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already done") == 5  # corpus, tokenizer, tokenize, train, convert
    assert "iteration" not in again.stdout.split("=== [5/7]")[0].split("=== [4/7]")[1]


def test_quickstart_resumes_an_interrupted_training(tmp_path):
    """On the user's own files (--corpus): training killed after its first checkpoint; the rerun resumes from it
    (the trainer logs 'resumed from') instead of starting over."""
    from pydoc_data.topics import topics

    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)), encoding="utf-8")
    run_dir = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "launch.quickstart", "--run-dir", str(run_dir), "--steps", "12",
           "--corpus", str(corpus), "--config", os.path.join(ROOT, "configs/train/tiny.yaml"),
           "checkpoint.interval=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "saved checkpoint" in line and "step00000004" in line:
            os.killpg(proc.pid, 9)  # the whole quickstart, torchrun and its workers: a crash, not a clean stop
            break
    proc.wait(timeout=60)
    assert any("step00000004" in line for line in seen), "".join(seen)[-3000:]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at iteration 4" in again.stdout
    state = json.loads((run_dir / "quickstart.json").read_text())
    assert state["train"]["valid"][0] == 12 and state["tokenize"]["tokens"] > 50_000
    assert not (run_dir / "corpus").exists()  # the embedded corpus was not written


def test_corpus_option_files_datasets_folder_or_name(tmp_path):
    from launch.quickstart import _input_args, build_parser

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")

    def args_for(*corpus):
        return _input_args(build_parser().parse_args(["--corpus", *corpus]), str(tmp_path / "run"))[0]

    assert build_parser().parse_args([]).corpus is None
    assert _input_args(build_parser().parse_args([]), "R")[0] == [os.path.join("R", "corpus", "embedded.jsonl")]
    assert args_for(str(tmp_path / "*.jsonl"))[0] == str(tmp_path / "*.jsonl")
    assert args_for(str(saved))[:2] == ["--hf-dataset", str(saved)]
    assert args_for("wikitext")[:2] == ["--hf-dataset", "wikitext"]


def test_a_bad_override_stops_before_any_phase_and_help_installs_nothing(tmp_path):
    """A typo in a training override used to surface only after the corpus, tokenizer and tokenize phases; and
    `quickstart.sh --help` ran the pip installs before printing its usage."""
    done = _quickstart(tmp_path / "qs", "optim.lrr=1")
    assert done.returncode == 2 and "quickstart: error: " in done.stderr and "optim.lrr: unknown field" in done.stderr
    assert not (tmp_path / "qs").exists()
    shown = subprocess.run(["bash", "launch/quickstart.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert shown.returncode == 0 and shown.stdout.startswith("usage: bash launch/quickstart.sh")
    assert "setup:" not in shown.stdout + shown.stderr
