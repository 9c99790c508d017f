"""The model demo: build a MEGA from a YAML config, save it in Hugging Face format, load it into all six heads.

No training: it proves the checkpoint format and the heads in seconds. The main job (`bash launch/quickstart.sh`,
launch/quickstart.py) runs the full pipeline: corpus, tokenizer, DeepSpeed pretraining, conversion, the six heads.
"""

from __future__ import annotations

import os
import time

import torch

from megatron_mega.model import MEGA_HEADS, MegaConfig, MegaForCausalLM


def run_demo(model_config: MegaConfig, output_dir: str, seed: int = 0, new_tokens: int = 16) -> dict:
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = MegaForCausalLM(model_config).eval()
    checkpoint = os.path.join(output_dir, "causal-lm")
    model.save_pretrained(checkpoint)
    print(f"saved MegaForCausalLM ({model.num_parameters():,} parameters) to {checkpoint}")

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model_config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        reference = model(prompt).logits
    rows = []
    for task, cls in MEGA_HEADS.items():
        head, report = cls.from_pretrained(checkpoint, output_loading_info=True)
        inputs = prompt.unsqueeze(1).expand(-1, 2, -1) if task == "multiple-choice" else prompt
        with torch.no_grad():
            out = head(inputs)
        shape = tuple(out.start_logits.shape) if task == "question-answering" else tuple(out.logits.shape)
        rows.append((cls.__name__, len(report.loaded_keys), len(report.missing_keys), shape))
    reloaded = MegaForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        same = torch.equal(reloaded(prompt).logits, reference)
    if not same:
        raise RuntimeError("reloaded MegaForCausalLM does not reproduce the saved model's logits")
    generated = reloaded.generate(prompt, max_new_tokens=new_tokens)

    print(f"\n{'head':34} {'loaded':>7} {'new':>5}  output shape")
    for name, loaded, new, shape in rows:
        print(f"{name:34} {loaded:7d} {new:5d}  {shape}")
    print(f"\nreload reproduces logits exactly: {same}")
    print(f"greedy continuation of a random prompt (ids): {generated[0, -new_tokens:].tolist()}")
    elapsed = time.perf_counter() - started
    print(f"demo finished in {elapsed:.1f} s")
    return {"heads": rows, "generated": generated, "seconds": elapsed}
