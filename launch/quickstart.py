"""The quickstart (the README's main job): corpus -> tokenizer -> tokenized dataset -> DeepSpeed pretraining on N
local processes -> validation perplexity -> Hugging Face conversion -> all six heads -> a greedy sample.

    python -m launch.quickstart                      # embedded corpus (Python's own docs), 300 steps, 2 processes
    python -m launch.quickstart --steps 40           # a reduced run
    python -m launch.quickstart --corpus 'my/*.jsonl' --run-dir runs/mine
    python -m launch.quickstart --corpus wikitext --hf-config wikitext-2-raw-v1   # a `datasets` name

Every phase runs the project's own command (`megatron-mega prepare ...`, the training module under torchrun,
`megatron-mega convert`) and records itself in RUN_DIR/quickstart.json with a key of its inputs. A rerun skips the
phases whose key is unchanged; an interrupted training resumes from its newest checkpoint (checkpoint.dir), so
rerunning after Ctrl-C or a crash continues instead of starting over. `--fresh` deletes the run directory first.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from typing import Any, Optional, Sequence

from launch.local import checked_config, launch_env, run_streaming, train_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "train", "demo.yaml")
TRAIN_LINE = re.compile(r"iteration (\d+)/(\d+) .*\| loss ([\d.naif]+) .*\| tokens/s (\d+)")
EVAL_LINE = re.compile(r"(valid|test) at iteration (\d+) \| loss ([\d.]+) \| perplexity ([\d.einf]+)")
PROMPT = "The for statement is used to"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class State:
    """RUN_DIR/quickstart.json: per phase, the key of its inputs, its wall time and what it measured."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "quickstart.json")
        self.data: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as fh:
                self.data = json.load(fh)

    def done(self, phase: str, key: str) -> Optional[dict]:
        entry = self.data.get(phase)
        return entry if entry and entry.get("key") == key else None

    def record(self, phase: str, key: str, seconds: float, **info: Any) -> dict:
        self.data[phase] = {"key": key, "seconds": round(seconds, 2), **info}
        self.save()
        return self.data[phase]

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=1)
        os.replace(tmp, self.path)


def _banner(index: int, total: int, name: str, note: str = "") -> None:
    print(f"\n=== [{index}/{total}] {name}{' — ' + note if note else ''}", flush=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_mega.cli", *args]


def _run(cmd: Sequence[str], log: str, env: Optional[dict] = None, on_line=None) -> None:
    print(f"+ {shlex.join(cmd)}", flush=True)
    rc = run_streaming(cmd, log, env=env, on_line=on_line)
    if rc != 0:
        raise SystemExit(f"quickstart: command failed with exit code {rc} (log: {log}); fix it and rerun, "
                         f"finished phases are kept")


def _load_config(path: str) -> dict:
    from megatron_mega.yaml_config import load_yaml

    return load_yaml(path)


def _input_args(args: argparse.Namespace, run_dir: str) -> tuple[list[str], Any]:
    """(prepare options naming the corpus, a description of it for the phase keys)."""
    if not args.corpus:
        return [os.path.join(run_dir, "corpus", "embedded.jsonl")], ("embedded", args.max_corpus_chars)
    paths = [p for pattern in args.corpus for p in (sorted(glob.glob(pattern)) or [pattern]) if os.path.exists(p)]
    saved = len(paths) == 1 and os.path.isdir(paths[0]) and any(
        os.path.exists(os.path.join(paths[0], f)) for f in ("dataset_dict.json", "state.json"))
    if paths and not saved:
        stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths if os.path.isfile(p)]
        return (list(args.corpus) + ["--text-key", args.text_key, "--txt-unit", args.txt_unit],
                ("files", args.corpus, stats, args.text_key, args.txt_unit))
    if len(args.corpus) != 1:
        raise SystemExit(f"quickstart: --corpus {args.corpus}: no such files (a `datasets` name is a single word)")
    # a `datasets` name (datasets.load_dataset) or a save_to_disk folder
    extra = ["--hf-dataset", args.corpus[0], "--hf-split", args.hf_split, "--text-key", args.text_key]
    if args.hf_config:
        extra += ["--hf-config", args.hf_config]
    if args.hf_data_files:
        extra += ["--hf-data-files", *args.hf_data_files]
    return extra, ("datasets", args.corpus[0], args.hf_config, args.hf_split, args.text_key, args.hf_data_files)


def _check_overrides(args: argparse.Namespace) -> None:
    """The config and the user's overrides, checked before the corpus and tokenizer phases spend minutes."""
    from megatron_mega.training.config import TrainConfigError

    try:
        checked_config(args.config, args.overrides, args.nproc)
    except TrainConfigError as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> dict:
    run_dir = os.path.abspath(args.run_dir)
    _check_overrides(args)
    if args.fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    logs = os.path.join(run_dir, "logs")
    state = State(run_dir)
    config = _load_config(args.config)
    vocab = int(config["model"]["vocab_size"])
    steps = args.steps or int(config["optim"]["train_steps"])
    env = launch_env()
    started = time.perf_counter()
    total = 7
    corpus_args, corpus_key = _input_args(args, run_dir)
    tok_dir, data_dir = os.path.join(run_dir, "tokenizer"), os.path.join(run_dir, "dataset")
    ckpt_dir, hf_dir = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "hf", "causal-lm")

    # 1. corpus
    key = _key(corpus_key)
    _banner(1, total, "corpus")
    if (entry := state.done("corpus", key)) and (args.corpus or os.path.exists(corpus_args[0])):
        print(f"already done: {entry.get('documents', '?')} documents (skipped)")
    elif args.corpus:
        state.record("corpus", key, 0.0, documents="(user corpus)")
        print(f"user corpus: {shlex.join(corpus_args)}")
    else:
        from launch.corpus import write_embedded_corpus

        t = time.perf_counter()
        counts = write_embedded_corpus(corpus_args[0], args.max_corpus_chars)
        state.record("corpus", key, time.perf_counter() - t, **counts)
        print(f"wrote {corpus_args[0]}: {counts['documents']} documents, {counts['characters']:,} characters "
              f"(pydoc topics + standard-library docstrings)")

    # 2. tokenizer
    key = _key(state.data["corpus"]["key"], vocab)
    _banner(2, total, "tokenizer", f"sentencepiece unigram, vocab {vocab}")
    if state.done("tokenizer", key) and os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        print("already done (skipped)")
    else:
        t = time.perf_counter()
        _run(_cli("prepare", "tokenizer", *corpus_args, "--output", tok_dir, "--vocab-size", str(vocab),
                  "--threads", "2", "--overwrite"), os.path.join(logs, "tokenizer.log"), env)
        state.record("tokenizer", key, time.perf_counter() - t)

    # 3. tokenize
    key = _key(state.data["tokenizer"]["key"])
    _banner(3, total, "tokenize", "Megatron .bin/.idx shards + manifest.json")
    if state.done("tokenize", key) and os.path.exists(os.path.join(data_dir, "manifest.json")):
        print("already done (skipped)")
    else:
        if os.path.isdir(data_dir) and state.data.get("tokenize", {}).get("key") not in (None, key):
            shutil.rmtree(data_dir)  # made with another tokenizer or corpus
        t = time.perf_counter()
        _run(_cli("prepare", "tokenize", *corpus_args, "--output", data_dir, "--tokenizer", tok_dir,
                  "--workers", str(args.nproc), "--no-progress"), os.path.join(logs, "tokenize.log"), env)
        state.record("tokenize", key, time.perf_counter() - t, tokens=_dataset_tokens(data_dir))

    # 4. train (+ 5. validation perplexity, evaluated by the trainer at the last step)
    overrides = [f"data.paths={json.dumps([data_dir])}", f"tokenizer={tok_dir}", f"optim.train_steps={steps}",
                 f"optim.warmup_steps={min(int(config['optim'].get('warmup_steps', 0)), max(steps // 10, 1))}",
                 f"checkpoint.dir={ckpt_dir}", f"checkpoint.interval={max(min(100, steps // 3), 1)}",
                 "checkpoint.keep_last=2", f"logging.eval_interval={steps}",
                 f"logging.interval={max(1, min(10, steps // 10))}",
                 f"logging.tensorboard_dir={os.path.join(run_dir, 'tensorboard')}", *args.overrides]
    key = _key(state.data["tokenize"]["key"], os.path.abspath(args.config), config, overrides, args.nproc)
    _banner(4, total, "pretrain", f"{steps} steps, DeepSpeed on {args.nproc} local processes (torchrun)")
    entry = state.done("train", key)
    if entry and os.path.isdir(ckpt_dir):
        print(f"already done: {entry['steps']} steps (skipped)")
    else:
        if os.path.isdir(ckpt_dir) and state.data.get("train_key") not in (None, key):
            shutil.rmtree(ckpt_dir)  # another config/corpus: its checkpoints must not be resumed
        state.data["train_key"] = key  # saved before training: a rerun after a crash knows whose checkpoints these are
        state.save()
        seen: dict[str, Any] = {"tokens_per_s": [], "valid": None, "test": None, "first_step": None}

        def on_line(line: str) -> None:
            if m := TRAIN_LINE.search(line):
                seen["first_step"] = seen["first_step"] or int(m.group(1))
                seen["tokens_per_s"].append(int(m.group(4)))
                seen["loss"] = float(m.group(3))
            elif m := EVAL_LINE.search(line):
                seen[m.group(1)] = (int(m.group(2)), float(m.group(3)))

        t = time.perf_counter()
        cmd = train_command(args.config, overrides, args.nproc)
        _run(cmd, os.path.join(logs, "train.log"), env, on_line)
        rates = seen["tokens_per_s"][1:] or seen["tokens_per_s"]  # the first interval includes start-up
        info = {"steps": steps, "tokens_per_s": round(sum(rates) / len(rates)) if rates else None,
                "train_loss": seen.get("loss"), "valid": seen["valid"], "test": seen["test"],
                "command": shlex.join(cmd)}
        state.record("train", key, time.perf_counter() - t, **info)
    train = state.data["train"]
    _banner(5, total, "validation perplexity")
    if train.get("valid"):
        step, loss = train["valid"]
        print(f"validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} (at step {step})")
    else:
        print("no validation split was evaluated (corpus too small for a validation document?)")

    # 6. convert
    key = _key(train["key"])
    _banner(6, total, "convert", "training checkpoint -> Hugging Face directory (megatron-mega convert)")
    if state.done("convert", key) and os.path.exists(os.path.join(hf_dir, "config.json")):
        print("already done (skipped)")
    else:
        t = time.perf_counter()
        _run(_cli("convert", ckpt_dir, hf_dir, "--force"), os.path.join(logs, "convert.log"), env)
        state.record("convert", key, time.perf_counter() - t)

    # 7. heads + generation (always: it is the proof, and takes seconds)
    _banner(7, total, "load all six heads, greedy generation")
    t = time.perf_counter()
    heads, sample = load_heads_and_generate(hf_dir, tok_dir, args.prompt, args.new_tokens)
    state.record("heads", key, time.perf_counter() - t, heads=heads, sample=sample)
    state.data["total_seconds_this_run"] = round(time.perf_counter() - started, 1)
    print_summary(state.data, run_dir)
    return state.data


def _dataset_tokens(data_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(data_dir, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    for key in ("num_tokens", "tokens", "total_tokens"):
        if isinstance(manifest.get(key), int):
            return manifest[key]
    return None


def load_heads_and_generate(hf_dir: str, tok_dir: str, prompt: str, new_tokens: int) -> tuple[list, str]:
    import torch

    from megatron_mega.data.tokenizer import Tokenizer
    from megatron_mega.model import MEGA_HEADS, MegaForCausalLM

    tokenizer = Tokenizer.load(tok_dir)
    ids = torch.tensor([tokenizer.encode(prompt)])
    rows = []
    for task, cls in MEGA_HEADS.items():
        head, report = cls.from_pretrained(hf_dir, output_loading_info=True)
        inputs = ids.unsqueeze(1).expand(-1, 2, -1) if task == "multiple-choice" else ids
        with torch.no_grad():
            out = head.eval()(inputs)
        shape = tuple(out.start_logits.shape) if task == "question-answering" else tuple(out.logits.shape)
        rows.append([cls.__name__, len(report.loaded_keys), len(report.missing_keys), list(shape)])
        print(f"  {cls.__name__:34} loaded {len(report.loaded_keys):4d} tensors, {len(report.missing_keys):2d} new, "
              f"output {shape}")
    model = MegaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=new_tokens)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, top_k=40, temperature=0.8)
    text = tokenizer.decode(greedy[0, ids.shape[1]:].tolist())
    sample = tokenizer.decode(sampled[0, ids.shape[1]:].tolist())
    # repr: a small model's greedy text is often runs of spaces/newlines (indentation is common in docstrings)
    print(f"\ngreedy continuation of {prompt!r}:\n  {prompt + text!r}")
    print(f"sampled (top-k 40, temperature 0.8, seed 0):\n  {prompt + sample!r}")
    return rows, prompt + text


def print_summary(data: dict, run_dir: str) -> None:
    train = data.get("train", {})
    print("\n=== summary")
    rows = [("phase", "wall s", "")]
    for phase in ("corpus", "tokenizer", "tokenize", "train", "convert", "heads"):
        entry = data.get(phase, {})
        note = ""
        if phase == "corpus":
            note = (f"{entry['documents']} documents, {entry['characters']:,} characters" if "characters" in entry
                    else "your corpus (--corpus)")
        if phase == "tokenize" and entry.get("tokens"):
            note = f"{entry['tokens']:,} tokens"
        if phase == "train":
            note = f"{train.get('steps')} steps, {train.get('tokens_per_s')} tokens/s, final train loss " \
                   f"{train.get('train_loss')}"
        if phase == "heads":
            note = f"{len(entry.get('heads', []))} heads loaded"
        rows.append((phase, f"{entry.get('seconds', 0):.1f}", note))
    if train.get("valid"):
        rows.append(("validation", "", f"loss {train['valid'][1]:.4f}, perplexity {math.exp(train['valid'][1]):.2f}"))
    if train.get("test"):
        rows.append(("test", "", f"loss {train['test'][1]:.4f}, perplexity {math.exp(train['test'][1]):.2f}"))
    rows.append(("this run", f"{data.get('total_seconds_this_run', 0):.1f}", "(skipped phases cost ~0)"))
    for name, secs, note in rows:
        print(f"{name:12} {secs:>8}  {note}")
    print(f"\nrun directory: {run_dir} (logs/, checkpoints/, hf/causal-lm, quickstart.json)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bash launch/quickstart.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", default=None,
                   help="your files/folders/globs (jsonl/json/txt/parquet/csv) or one `datasets` name "
                        "(default: the embedded corpus of Python's documentation)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--txt-unit", default="file", choices=("file", "paragraph", "line"))
    p.add_argument("--hf-config", default=None, help="with a `datasets` name: its configuration")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-data-files", nargs="+", default=None, help="with a `datasets` builder name such as json")
    p.add_argument("--max-corpus-chars", type=int, default=None, help="cap the embedded corpus (tests)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training YAML (default configs/train/demo.yaml)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's, 300)")
    p.add_argument("--nproc", type=int, default=2, help="local training processes")
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "quickstart"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--fresh", action="store_true", help="delete the run directory and start over")
    p.add_argument("overrides", nargs="*", help="dotted training overrides, e.g. optim.lr=1e-3")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
