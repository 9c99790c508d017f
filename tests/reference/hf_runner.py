"""Runs inside the transformers 4.57.6 virtual environment (never imports megatron_mega).

usage: python hf_runner.py JOBS.json STATUS.json

JOBS.json is a list of jobs, run in order in this one process (importing transformers costs seconds):
  {"name": str, "mode": "load" | "save", "dir": str, "head": "MegaForCausalLM" | ... | "MegaModel",
   "inputs": file.safetensors, "outputs": file.safetensors,
   "config": {...}  (save mode: MegaConfig keyword arguments), "seed": int (save mode),
   "perturb": bool  (save mode: offset every weight, see perturb.py, before saving)}
load: transformers' class loads `dir` (written by megatron_mega), runs the inputs, writes its outputs.
save: transformers builds a model from `config` (seeded), saves it to `dir`, runs the inputs, writes its outputs.

Every tensor of the inputs file is passed to forward() by name (input_ids, attention_mask, token_type_ids, ...).
Outputs written: logits, start_logits, end_logits, last_hidden_state, pooler_output (those the class returns) and
hidden_states.<i> for every entry of output_hidden_states (the embeddings, then each layer), all batch-first.

A job that raises does not stop the others: STATUS.json records, per job name, {"ok": bool, "stage": where it
stopped ("load" | "save" | "forward"), "error": str, "loading_info": {...}} plus the transformers version, so a test
can assert that transformers fails where it is known to be defective.
"""

import json
import os
import sys
import traceback
import warnings

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from perturb import perturb_weights  # noqa: E402  (this script's own folder is on sys.path)

hf_logging.set_verbosity_error()
OUTPUT_FIELDS = ("logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output")


def run(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    result = {}
    for name in OUTPUT_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            result[name] = value.detach().contiguous()
    for index, value in enumerate(getattr(out, "hidden_states", None) or ()):
        result[f"hidden_states.{index}"] = value.detach().contiguous()
    return result


def run_job(job, status):
    cls = getattr(transformers, job["head"])
    status["stage"] = job["mode"]
    if job["mode"] == "load":
        model, info = cls.from_pretrained(job["dir"], output_loading_info=True)
        status["loading_info"] = {key: [str(item) for item in value] for key, value in info.items()
                                  if key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    elif job["mode"] == "save":
        torch.manual_seed(job.get("seed", 0))
        model = cls(transformers.MegaConfig(**job["config"]))
        if job.get("perturb"):
            perturb_weights(model, job.get("seed", 0) + 1)
        model.save_pretrained(job["dir"])
    else:
        raise ValueError(f"unknown mode {job['mode']!r}")
    model.to(torch.float32)
    inputs = load_file(job["inputs"])
    status["stage"] = "forward"
    save_file(run(model, inputs), job["outputs"])
    status["ok"] = True


def main():
    jobs_path, status_path = sys.argv[1], sys.argv[2]
    with open(jobs_path, encoding="utf-8") as fh:
        jobs = json.load(fh)
    statuses = {}
    for job in jobs:
        status = statuses[job["name"]] = {"ok": False, "stage": None, "error": None, "loading_info": None}
        try:
            run_job(job, status)
        except Exception as err:  # noqa: BLE001 - recorded per job, asserted by the tests
            status.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=-3))
    if any(name.startswith("megatron_mega") for name in sys.modules):
        raise SystemExit("hf_runner: megatron_mega was imported into the reference environment")
    report = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
              "jobs": statuses}
    tmp = status_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    os.replace(tmp, status_path)
    failed = sum(not s["ok"] for s in statuses.values())
    print(f"hf_runner: {len(jobs)} jobs, {failed} raised")


if __name__ == "__main__":
    main()
