"""Four processes: a 2 (pipeline stages) x 2 (data parallel) run converted to Hugging Face, and Hugging Face
directories (ours and one saved by transformers 4.57.6) written as step-0 training checkpoints of the plain and the
2x2 pipeline layout, converted back, with bit-identical weights.

One world of 4 gloo processes runs every job (plain engines first: a plain engine after a pipeline engine in the
same process trips DeepSpeed's global state)."""

from __future__ import annotations

import json
import os
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_mega import MEGA_HEADS, MegaConfig, MegaForCausalLM
from megatron_mega.convert.commands import run_convert
from megatron_mega.convert.training_checkpoint import read_training_checkpoint
from megatron_mega.model.pretrained import read_state_dict
from tests.training.test_train_world import hf_directory, job
from tests.training.world import run_jobs

WORLD = 4
SOURCES = ("ours", "transformers")


@pytest.fixture(scope="module")
def world(tiny_dict, tmp_path_factory, reference_runner):
    out = tmp_path_factory.mktemp("convert-layouts")
    hf = {"ours": str(out / "hf-ours"), "transformers": str(out / "hf-transformers")}
    # ours: a seeded MegaForCausalLM with every weight moved off its initialisation
    hf_directory(tiny_dict["model"], hf["ours"], seed=21)
    # transformers 4.57.6's own save_pretrained, its weights perturbed the same way (tests/reference/perturb.py)
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(3, 2000, (1, 16))}, str(out / "inputs.safetensors"))  # a whole chunk
    status = reference_runner([{"name": "save", "mode": "save", "dir": hf["transformers"], "head": "MegaForCausalLM",
                                "config": tiny_dict["model"], "seed": 5, "perturb": True,
                                "inputs": str(out / "inputs.safetensors"),
                                "outputs": str(out / "hf-outputs.safetensors")}], out)
    assert status["jobs"]["save"]["ok"], status["jobs"]["save"]

    batch = dict(optim__global_batch_size=4, optim__micro_batch_size=1)
    dirs = {"2x2": str(out / "run-2x2")}
    jobs = []
    # optim.train_steps: 0 writes the starting weights as the checkpoint of step 0, no optimizer step
    for layout in ("plain", "pipe"):  # plain engines first
        for source in SOURCES:
            name = f"{layout}-{source}"
            dirs[name] = str(out / name)
            parallel = dict(parallel__pipeline_stages=2, parallel__zero_stage=1) if layout == "pipe" else \
                dict(parallel__zero_stage=1)
            jobs.append(job(tiny_dict, checkpoint__dir=dirs[name], checkpoint__init_from_hf=hf[source],
                            optim__train_steps=0, **parallel, **batch))
    # 2 stages x 2 data-parallel ranks, two optimizer steps from the seeded initialisation
    jobs.append(job(tiny_dict, parallel__pipeline_stages=2, parallel__zero_stage=1, checkpoint__dir=dirs["2x2"],
                    optim__train_steps=2, optim__lr=1e-2, optim__warmup_steps=0, checkpoint__interval=0, **batch))
    results = run_jobs(WORLD, jobs, str(out / "results"))
    return {"dirs": dirs, "hf": hf, "results": results}


def convert(checkpoint: str, output: str, **options) -> int:
    args = dict(head=None, step=None, num_labels=None, dtype="float32", tokenizer=None,
                bidirectional_to_causal=False, max_shard_size="5GB", force=False)
    args.update(options)
    return run_convert(Namespace(checkpoint=checkpoint, output=output, **args))


# ---- 2 x 2 -> Hugging Face -------------------------------------------------------------------------------------------

def training_side_forward(tag_dir: str, config: MegaConfig, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and logits computed by the pipeline's own layer modules (EmbeddingPipe, MegaBlockPipe,
    LMHeadPipe), each loaded strictly from its `layer_XX-model_states.pt`: the model as the training world ran it,
    without the converter's name map."""
    from megatron_mega.parallel.layers import EmbeddingPipe, LMHeadPipe, MegaBlockPipe
    from megatron_mega.parallel.layout import pipeline_layout

    layout = pipeline_layout(config, "causal")

    def load(module, index):
        state = torch.load(os.path.join(tag_dir, f"layer_{index:02d}-model_states.pt"), weights_only=True)
        module.load_state_dict(state, strict=True)
        return module.eval()

    embedding = load(EmbeddingPipe(config), layout.embedding_layer)
    blocks = [load(MegaBlockPipe(config), layout.block_layer(i)) for i in range(layout.num_blocks)]
    head = load(LMHeadPipe(config), layout.head_layer)
    with torch.no_grad():
        hidden = embedding((ids,))
        for block in blocks:
            hidden = block(hidden)
        hidden = head(hidden)
        weight = head.weight if head.weight is not None else embedding.word_embeddings.weight
        logits = torch.nn.functional.linear(head.transform(hidden), weight, head.bias)
    return hidden, logits


def test_two_by_two_converts_to_the_training_model(world, tmp_path):
    run = world["dirs"]["2x2"]
    result = world["results"][-1]
    assert result["stopped"] == "finished" and sorted(result["losses"], key=int) == ["1", "2"], result
    weights = read_training_checkpoint(run)
    assert weights.step == 2
    assert weights.layout["pipeline_stages"] == 2 and weights.layout["data_parallel_size"] == 2
    tag_dir = weights.tag_dir
    # each stage saved its layers once (the data-parallel replicas do not write their own copies)
    layer_files = sorted(n for n in os.listdir(tag_dir) if n.startswith("layer_"))
    assert len(layer_files) >= 4, layer_files

    out = tmp_path / "hf"
    assert convert(run, str(out)) == 0
    assert json.loads((out / "conversion.json").read_text())["self_check_relative_error"] == 0.0
    ids = torch.randint(3, 2000, (2, 40), generator=torch.Generator().manual_seed(3))  # 3 chunks of 16, padded
    expected_hidden, expected_logits = training_side_forward(tag_dir, weights.config, ids)
    # the weights moved: the comparison is not between two initialisations
    torch.manual_seed(1234)
    fresh = MegaForCausalLM(weights.config).eval()
    with torch.no_grad():
        assert (fresh.mega(ids).last_hidden_state - expected_hidden).abs().max() > 1e-4
    for task, cls in MEGA_HEADS.items():
        model = cls.from_pretrained(out).eval()
        with torch.no_grad():
            hidden = model.mega(ids).last_hidden_state
        error = float((hidden - expected_hidden).abs().max() / expected_hidden.abs().max())
        assert error <= 1e-6, (task, error)
        if task == "causal-lm":
            assert torch.equal(hidden, expected_hidden)
            with torch.no_grad():
                logits = model(ids).logits
            assert float((logits - expected_logits).abs().max() / expected_logits.abs().max()) <= 1e-6


# ---- Hugging Face -> step-0 training checkpoint -> Hugging Face ------------------------------------------------------

def assert_same_files(original: str, converted: str) -> None:
    """The converted directory's tensors are the original's, bit for bit, under the same names."""
    before, after = read_state_dict(original), read_state_dict(converted)
    assert set(after) == set(before), (sorted(set(after) ^ set(before)))
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


@pytest.mark.parametrize("layout", ["plain", "pipe"])
@pytest.mark.parametrize("source", SOURCES)
def test_hf_to_step0_checkpoint_and_back_is_identical(world, tmp_path, layout, source):
    run = world["dirs"][f"{layout}-{source}"]
    weights = read_training_checkpoint(run)
    assert weights.step == 0 and weights.consumed_samples == 0
    assert weights.layout["pipeline_stages"] == (2 if layout == "pipe" else 1)
    assert weights.layout["data_parallel_size"] == (2 if layout == "pipe" else 4)
    out = tmp_path / "hf"
    assert convert(run, str(out)) == 0
    assert_same_files(world["hf"][source], str(out))
    original = MegaForCausalLM.from_pretrained(world["hf"][source]).state_dict()
    assert all(torch.equal(weights.state[k], v) for k, v in original.items())
    # the transformers-saved directory's weights were not ours: both sources are really tested
    if source == "transformers":
        ours = load_file(os.path.join(world["hf"]["ours"], "model.safetensors"))
        theirs = load_file(os.path.join(world["hf"]["transformers"], "model.safetensors"))
        assert not torch.equal(ours["mega.layers.0.mega_layer.v_proj.weight"],
                               theirs["mega.layers.0.mega_layer.v_proj.weight"])
