"""Runs inside the transformers 4.57.6 virtual environment (never imports megatron_mega).

usage: python hf_runner.py JOBS.json
Each job: {"mode": "load"|"save", "dir": ..., "head": "MegaForCausalLM", "inputs": file.safetensors,
           "outputs": file.safetensors, "config": {...} (save mode), "seed": int}
load: transformers' class loads `dir` (written by megatron_mega), runs the inputs, writes its outputs.
save: transformers builds a model from `config`, saves it to `dir`, runs the inputs, writes its outputs.
"""

import json
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()


def run(model, inputs):
    model.eval()
    kwargs = {k: v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True, return_dict=True)
    result = {}
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            result[name] = value.contiguous()
    if getattr(out, "hidden_states", None) is not None:
        result["last_hidden"] = out.hidden_states[-1].contiguous()
    return result


def main():
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        cls = getattr(transformers, job["head"])
        if job["mode"] == "load":
            model = cls.from_pretrained(job["dir"])
        else:
            torch.manual_seed(job.get("seed", 0))
            config = transformers.MegaConfig(**job["config"])
            model = cls(config)
            model.save_pretrained(job["dir"])
        model.to(torch.float32)
        inputs = load_file(job["inputs"])
        save_file(run(model, inputs), job["outputs"])
    print(f"hf_runner: {len(jobs)} jobs done")


if __name__ == "__main__":
    main()
