"""Training checkpoints (ZeRO 0 and 3, a 2-stage pipeline, masked LM) -> Hugging Face directories.

The runs train the same tiny model on the same data under different layouts, so their weights agree to float
round-off: converted directories that agree with each other prove that no layout scrambles names (a wrong mapping
gives O(1) differences). The converted heads load in our six classes and in transformers 4.57.6's."""

from __future__ import annotations

import json
import os
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mega import MEGA_HEADS, MegaForCausalLM, MegaForMaskedLM
from megatron_mega.convert.commands import run_convert
from megatron_mega.convert.training_checkpoint import TrainingCheckpointError, read_training_checkpoint
from tests.training.test_train_world import hf_directory, job
from tests.training.world import run_jobs

STEPS = dict(optim__train_steps=4, optim__global_batch_size=4, optim__micro_batch_size=2,
             checkpoint__interval=2)


@pytest.fixture(scope="module")
def runs(tiny_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert-runs")
    dirs = {name: str(out / name) for name in ("zero0", "zero1", "zero2", "zero3", "pipe", "mlm", "from_hf",
                                                "hf_source")}
    # a Hugging Face directory to continue pretraining from, under a pipeline layout
    hf_directory(tiny_dict["model"], dirs["hf_source"], seed=7)
    # each ZeRO run also saves the weights its engine ends with (<dir>.final.pt), gathered from the live process
    jobs = [
        job(tiny_dict, "final_state", {"path": dirs[f"zero{stage}"] + ".final.pt"}, parallel__zero_stage=stage,
            checkpoint__dir=dirs[f"zero{stage}"], **STEPS)
        for stage in range(4)
    ] + [
        job(tiny_dict, objective="mlm", model__is_decoder=False, model__bidirectional=True,
            checkpoint__dir=dirs["mlm"], **STEPS),
        # last: a plain engine after a pipeline engine in the same process trips DeepSpeed's global state
        job(tiny_dict, parallel__pipeline_stages=2, parallel__zero_stage=1, checkpoint__dir=dirs["pipe"], **STEPS),
        # one step at a negligible learning rate: the checkpoint holds the HF directory's weights
        job(tiny_dict, parallel__pipeline_stages=2, parallel__zero_stage=1, checkpoint__dir=dirs["from_hf"],
            checkpoint__init_from_hf=dirs["hf_source"], optim__train_steps=1, optim__lr=1e-9, optim__min_lr=0.0,
            optim__warmup_steps=0, optim__weight_decay=0.0, optim__global_batch_size=4,
            optim__micro_batch_size=2),
    ]
    run_jobs(2, jobs, str(out / "results"))
    return dirs


def convert(checkpoint: str, output: str, **options) -> int:
    args = dict(head=None, step=None, num_labels=None, dtype="float32", tokenizer=None,
                bidirectional_to_causal=False, max_shard_size="5GB", force=False)
    args.update(options)
    return run_convert(Namespace(checkpoint=checkpoint, output=output, **args))


def hidden(directory: str, ids: torch.Tensor, cls=MegaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return cls.from_pretrained(directory).mega(ids).last_hidden_state


def test_every_layout_converts_to_the_same_model(runs, tmp_path):
    for name in ("zero0", "zero1", "zero2", "zero3", "pipe"):
        assert convert(runs[name], str(tmp_path / name)) == 0
        files = set(os.listdir(tmp_path / name))
        assert {"config.json", "model.safetensors", "tokenizer.model", "megatron_mega_tokenizer.json",
                "README.md"} <= files
    # every ZeRO stage: the converted weights are the training process's final weights, bit for bit
    for stage in range(4):
        live = torch.load(runs[f"zero{stage}"] + ".final.pt")
        converted = load_file(str(tmp_path / f"zero{stage}" / "model.safetensors"))
        live_names = {name.removeprefix("lm.") for name in live}
        # the tied LM head is one parameter in the engine, saved under both names; the rotary bias's placeholder
        # buffer (transformers' layout) is no parameter
        extra = {name for name in set(converted) - live_names if not name.endswith("._float_tensor")}
        assert extra <= {"lm_head.weight"}, extra
        if "lm_head.weight" in converted and "lm_head.weight" not in live_names:
            assert torch.equal(converted["lm_head.weight"], converted["mega.embedding_layer.word_embeddings.weight"])
        for name, tensor in live.items():
            if name.removeprefix("lm.") in converted:
                assert torch.equal(converted[name.removeprefix("lm.")], tensor), (stage, name)
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = hidden(str(tmp_path / "zero0"), ids)
    for name in ("zero1", "zero2", "zero3", "pipe"):
        torch.testing.assert_close(hidden(str(tmp_path / name), ids), reference, rtol=1e-4, atol=1e-5)
    # the weights moved away from initialisation: the comparison is not between untrained models
    torch.manual_seed(1234)
    fresh = MegaForCausalLM(MegaForCausalLM.from_pretrained(tmp_path / "zero0").config).eval()
    assert (fresh.mega(ids).last_hidden_state - reference).abs().max() > 1e-3
    state = json.loads((tmp_path / "pipe" / "conversion.json").read_text())
    assert state["training step"] == 4 and state["self_check_relative_error"] == 0.0


def test_an_earlier_step_and_bad_requests(runs, tmp_path, capsys):
    assert convert(runs["zero3"], str(tmp_path / "s2"), step=2) == 0
    assert read_training_checkpoint(runs["zero3"], 2).step == 2
    assert convert(runs["zero3"], str(tmp_path / "s3"), step=3) == 2
    assert "no checkpoint for step 3" in capsys.readouterr().err
    assert convert(runs["zero3"], str(tmp_path / "s2")) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert convert(str(tmp_path), str(tmp_path / "x")) == 2
    assert "latest" in capsys.readouterr().err
    with pytest.raises(TrainingCheckpointError):
        read_training_checkpoint(str(tmp_path / "missing"))


def test_wrong_tokenizer_and_missing_pipeline_files_are_refused(runs, tmp_path, capsys, pydoc_dataset):
    import shutil

    from data_prep.train_tokenizer import TrainSettings, train

    other = str(tmp_path / "other-tokenizer")
    from pydoc_data.topics import topics

    train([topics[k] for k in sorted(topics)], TrainSettings(vocab_size=1500, threads=2)).save(other)
    assert convert(runs["zero0"], str(tmp_path / "t"), tokenizer=other) == 2
    assert "is not the one the run trained with" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(runs["pipe"], broken)
    tag = (broken / "latest").read_text().strip()
    next((broken / tag).glob("layer_01-model_states.pt")).unlink()
    assert convert(str(broken), str(tmp_path / "b")) == 2
    assert "layer" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_encoder_to_causal_is_refused_unless_asked(runs, tmp_path, capsys):
    assert convert(runs["mlm"], str(tmp_path / "mlm")) == 0  # default head: masked-lm
    assert MegaForMaskedLM.from_pretrained(tmp_path / "mlm").config.bidirectional
    assert convert(runs["mlm"], str(tmp_path / "causal"), head="causal-lm") == 2
    assert "bidirectional" in capsys.readouterr().err
    assert not (tmp_path / "causal").exists()
    assert convert(runs["mlm"], str(tmp_path / "causal"), head="causal-lm", bidirectional_to_causal=True) == 0
    causal = MegaForCausalLM.from_pretrained(tmp_path / "causal")
    assert causal.config.is_decoder and not causal.config.bidirectional
    encoder = MegaForMaskedLM.from_pretrained(tmp_path / "mlm")
    kept = causal.mega.layers[0].mega_layer.ema_gate.damping_factor
    assert torch.equal(kept, encoder.mega.layers[0].mega_layer.ema_gate.damping_factor[:kept.shape[0]])
    # the trained output layer moves with it (it was left freshly initialised, unreported)
    assert torch.equal(causal.lm_head.bias, encoder.mlm_head.bias) and causal.lm_head.bias.abs().sum() > 0
    assert torch.equal(causal.lm_head.weight, encoder.mlm_head.weight)


def test_each_head_loads_in_transformers_with_the_same_outputs(runs, tmp_path, reference_runner):
    ids = torch.randint(3, 2000, (2, 3, 16), generator=torch.Generator().manual_seed(1))
    jobs, ours = [], {}
    for task, cls in MEGA_HEADS.items():
        out = tmp_path / task
        assert convert(runs["pipe"], str(out), head=task, num_labels=3 if "classification" in task else None) == 0
        inputs = {"input_ids": (ids if task == "multiple-choice" else ids[:, 0]).contiguous()}
        save_file(inputs, str(out / "inputs.safetensors"))
        with torch.no_grad():
            result = cls.from_pretrained(out)(**inputs)
        ours[task] = result.start_logits if task == "question-answering" else result.logits
        jobs.append({"name": task, "mode": "load", "dir": str(out), "head": cls.__name__,
                     "inputs": str(out / "inputs.safetensors"), "outputs": str(out / "hf.safetensors")})
    status = reference_runner(jobs, tmp_path)
    for task in MEGA_HEADS:
        assert status["jobs"][task]["ok"], status["jobs"][task]
        theirs = load_file(str(tmp_path / task / "hf.safetensors"))
        theirs = theirs["start_logits" if task == "question-answering" else "logits"]
        error = float((ours[task] - theirs).abs().max() / theirs.abs().max())
        assert error <= 1e-4, (task, error)


def test_finetuning_a_converted_checkpoint_beats_chance(runs, tmp_path):
    """Sequence classification of word lists drawn from two disjoint vocabularies (chance: 50%)."""
    import json as _json
    import random

    from megatron_mega.finetune.commands import run_finetune

    assert convert(runs["zero0"], str(tmp_path / "hf")) == 0
    first = "apple river stone cloud green music paper window".split()
    second = "seven eleven twelve ninety hundred thousand million zero".split()
    rng = random.Random(0)
    for name, count in (("train", 160), ("eval", 40)):
        with open(tmp_path / f"{name}.jsonl", "w") as fh:
            for i in range(count):
                label = i % 2
                words = rng.choices(second if label else first, k=8)
                fh.write(_json.dumps({"text": " ".join(words), "label": label}) + "\n")
    from megatron_mega.data.tokenizer import Tokenizer
    from megatron_mega.finetune.examples import load_examples
    from megatron_mega.finetune.loop import FinetuneSettings, finetune

    settings = FinetuneSettings(num_labels=2, epochs=3, batch_size=16, lr=3e-3, max_length=64)
    result = finetune(str(tmp_path / "hf"), load_examples(str(tmp_path / "train.jsonl")),
                      load_examples(str(tmp_path / "eval.jsonl")), settings, Tokenizer.load(tmp_path / "hf"),
                      output_dir=str(tmp_path / "tuned"), print_fn=lambda *a: None)
    assert result.eval_after["loss"] < result.eval_before["loss"]
    assert result.eval_after["accuracy"] >= 0.8
    tuned = MEGA_HEADS["sequence-classification"].from_pretrained(tmp_path / "tuned")
    assert tuned.config.num_labels == 2 and not tuned.config.is_decoder
    # the command line: a missing column is one clear error
    args = Namespace(model=str(tmp_path / "hf"), task="sequence-classification", train=str(tmp_path / "train.jsonl"),
                     eval=None, split=None, text_key="sentence", text_pair_key=None, label_key="label",
                     num_labels=2, epochs=1, batch_size=16, lr=3e-3, max_length=64, seed=0, tokenizer=None,
                     output=None, force=False)
    assert run_finetune(args) == 2


def test_hf_directory_becomes_a_pipeline_training_checkpoint(runs, tmp_path):
    """HF dir -> pretraining continues under 2 pipeline stages -> its checkpoint -> HF dir: the same weights."""
    weights = read_training_checkpoint(runs["from_hf"])
    assert weights.layout["pipeline_stages"] == 2 and weights.step == 1
    source = MegaForCausalLM.from_pretrained(runs["hf_source"]).state_dict()
    assert set(weights.state) == set(source)
    for name, tensor in source.items():
        # one AdamW step at lr 1e-9 moves a weight by ~1e-9; a wrong mapping would move it by ~0.05
        torch.testing.assert_close(weights.state[name], tensor, rtol=0, atol=1e-7, msg=name)


def test_real_checkpoints_carry_the_format_version_and_damage_is_refused(runs, tmp_path, capsys):
    """Every checkpoint the trainer writes is stamped (trainer_state.json and DeepSpeed's client state); a missing
    ZeRO partition and a config that does not match the pipeline layer files are one clear error each."""
    import shutil

    from megatron_mega.training import checkpointing

    for name in ("zero0", "zero3", "pipe"):
        tag = open(os.path.join(runs[name], "latest")).read().strip()
        state = json.loads(open(os.path.join(runs[name], tag, "trainer_state.json")).read())
        assert state["format_version"] == checkpointing.FORMAT_VERSION, name
    blob = torch.load(os.path.join(runs["zero0"], "step00000004", "mp_rank_00_model_states.pt"), weights_only=False)
    assert blob["format_version"] == checkpointing.FORMAT_VERSION

    def one_line_error(checkpoint, *pieces):
        out = tmp_path / "out"
        assert convert(str(checkpoint), str(out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(p in err for p in pieces), err
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]

    zero = tmp_path / "zero3"
    shutil.copytree(runs["zero3"], zero)
    next((zero / "step00000004").glob("*rank_1*optim_states.pt")).unlink()
    one_line_error(zero, "cannot reconstruct the ZeRO weights")

    pipe = tmp_path / "pipe"
    shutil.copytree(runs["pipe"], pipe)
    state_file = pipe / "step00000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["intermediate_size"] = 48
    state_file.write_text(json.dumps(state))
    one_line_error(pipe, "trainer_state.json: its model config does not match the layer files", "size mismatch")
    state["format_version"] = checkpointing.FORMAT_VERSION + 1
    state_file.write_text(json.dumps(state))
    one_line_error(pipe, "trainer_state.json: field 'format_version' is")
