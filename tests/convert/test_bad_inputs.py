"""Every refusal of the converter, on both sides, is one clear line naming the file (and field) and leaves nothing.

Training side (`megatron-mega convert`): checkpoint folders in the trainer's ZeRO-0 layout are written here directly
(`latest`, `stepNNNNNNNN/trainer_state.json`, DeepSpeed's `mp_rank_00_model_states.pt` with the trainer's `lm.`
names), so each damage costs milliseconds; the same refusals on real DeepSpeed checkpoints (pipeline layer files,
ZeRO partitions) are in test_convert_training.py. Hugging Face side (`checkpoint.init_from_hf`): `initial_lm_state`,
the function the trainer calls before building anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mega import CheckpointError, MegaConfig, MegaForCausalLM
from megatron_mega.convert.commands import run_convert
from megatron_mega.convert.hf_import import check_hf_directory, initial_lm_state
from megatron_mega.training import checkpointing
from megatron_mega.yaml_config import load_yaml
from tests.training.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny():
    data = load_yaml(TINY)
    data["tokenizer"] = None
    return data


def write_run(root, tiny: dict, step: int = 3, model=None, **state_changes) -> str:
    """A training checkpoint folder as the trainer writes it under ZeRO 0 on one process (weights: `model`, by
    default a seeded MegaForCausalLM). `state_changes` override trainer_state.json fields (None deletes one)."""
    root = str(root)
    tag = checkpointing.tag_for(step)
    os.makedirs(os.path.join(root, tag))
    torch.manual_seed(11)
    model = model if model is not None else MegaForCausalLM(MegaConfig(**tiny["model"]))
    state = {"format_version": checkpointing.FORMAT_VERSION, "step": step, "consumed_samples": 4 * step,
             "config": tiny, "tokenizer_sha256": None, "world_size": 1,
             "layout": {"pipeline_stages": 1, "zero_stage": 0, "data_parallel_size": 1}}
    for key, value in state_changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    torch.save({"module": {"lm." + k: v for k, v in model.state_dict().items()}, **state},
               os.path.join(root, tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, tag, checkpointing.STATE_FILE), "w") as fh:
        json.dump(state, fh)
    with open(os.path.join(root, checkpointing.LATEST), "w") as fh:
        fh.write(tag + "\n")
    return root


def convert(checkpoint, output, **options) -> int:
    args = dict(head=None, step=None, num_labels=None, dtype="float32", tokenizer=None,
                bidirectional_to_causal=False, max_shard_size="5GB", force=False)
    args.update(options)
    return run_convert(Namespace(checkpoint=str(checkpoint), output=str(output), **args))


def refused(capsys, checkpoint, output, *expected: str, **options) -> str:
    """convert must exit 2 with one stderr line holding every `expected` piece, and write nothing at `output`."""
    assert convert(checkpoint, output, **options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megatron-mega convert: error: "), err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not os.path.exists(output)
    parent = os.path.dirname(str(output))
    if os.path.isdir(parent):
        assert not [n for n in os.listdir(parent) if n.startswith(".")], "a temporary folder was left behind"
    return err


# ---- training checkpoint -> HF --------------------------------------------------------------------------------------

def test_the_fabricated_checkpoint_converts(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    assert convert(run, tmp_path / "out") == 0
    assert "from step 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["training step"] == 3


def test_a_checkpoint_without_format_version_is_version_1(tmp_path, tiny):
    """Checkpoints written before format versions existed have no field: they read as version 1."""
    run = write_run(tmp_path / "run", tiny, format_version=None)
    assert "format_version" not in json.loads((tmp_path / "run" / "step00000003" / "trainer_state.json").read_text())
    assert convert(run, tmp_path / "out") == 0


@pytest.mark.parametrize("version, message", [
    (checkpointing.FORMAT_VERSION + 1, f"newer than the checkpoint format this megatron_mega reads "
                                       f"({checkpointing.FORMAT_VERSION})"),
    ("1", "not a checkpoint format version"),
    (0, "not a checkpoint format version"),
])
def test_an_unsupported_format_version_is_refused(tmp_path, tiny, capsys, version, message):
    run = write_run(tmp_path / "run", tiny, format_version=version)
    refused(capsys, run, tmp_path / "out", "step00000003/trainer_state.json: field 'format_version' is", message)


def test_a_damaged_trainer_state_is_refused(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    (tmp_path / "run" / "step00000003" / "trainer_state.json").write_text("{not json")
    refused(capsys, run, tmp_path / "out", "trainer_state.json: not a JSON trainer state")
    (tmp_path / "run" / "step00000003" / "trainer_state.json").unlink()
    refused(capsys, run, tmp_path / "out", "trainer_state.json: missing")


def test_wrong_directories_are_refused(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    refused(capsys, tmp_path / "nowhere", tmp_path / "out", "nowhere: not a directory")
    (tmp_path / "empty").mkdir()
    refused(capsys, tmp_path / "empty", tmp_path / "out", "no `latest` file")
    # one checkpoint of the run instead of the run's folder: the error says what to pass
    refused(capsys, tmp_path / "run" / "step00000003", tmp_path / "out",
            "one checkpoint of a run", f"pass {run} --step 3")
    # a Hugging Face directory is not a training checkpoint
    MegaForCausalLM(MegaConfig(**tiny["model"])).save_pretrained(tmp_path / "hf")
    refused(capsys, tmp_path / "hf", tmp_path / "out", "a Hugging Face model directory (config.json)")
    # `latest` names a checkpoint that is not there (an incomplete copy)
    (tmp_path / "run" / "latest").write_text("step00000009\n")
    refused(capsys, run, tmp_path / "out", "latest: names step00000009, which is missing")
    refused(capsys, run, tmp_path / "out", "no checkpoint for step 4", step=4)


def test_missing_weights_are_refused(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    (tmp_path / "run" / "step00000003" / "mp_rank_00_model_states.pt").unlink()
    refused(capsys, run, tmp_path / "out", "mp_rank_00_model_states.pt: missing")
    # a pipeline layout whose layer files are absent
    run = write_run(tmp_path / "pipe", tiny,
                    layout={"pipeline_stages": 2, "zero_stage": 1, "data_parallel_size": 1})
    refused(capsys, run, tmp_path / "out", "pipeline layer files missing")


def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path, tiny, capsys):
    other = json.loads(json.dumps(tiny))
    other["model"]["hidden_size"] = 48
    run = write_run(tmp_path / "run", tiny, config=other)
    refused(capsys, run, tmp_path / "out", "trainer_state.json: its model config does not match the saved weights")
    other["model"] = {"hidden_size": "wide"}
    run = write_run(tmp_path / "run2", tiny, config=other)
    refused(capsys, run, tmp_path / "out", "trainer_state.json has no usable model config")


def test_an_existing_output_is_kept_without_force(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert convert(run, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err
    assert os.listdir(tmp_path / "out") == ["mine.txt"]
    assert convert(run, tmp_path / "out", force=True) == 0
    assert "mine.txt" not in os.listdir(tmp_path / "out")


def test_force_never_replaces_the_checkpoint_it_converts(tmp_path, tiny, capsys):
    """An output that is the checkpoint folder, or a folder holding it, would be deleted by --force before the
    export moved in: refused, and the run is untouched."""
    run = write_run(tmp_path / "run", tiny)
    before = sorted(os.listdir(run))
    for output in (run, str(tmp_path)):
        assert convert(run, output, force=True) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "which this export reads; writing there would delete it" in err, err
    assert sorted(os.listdir(run)) == before and convert(run, tmp_path / "out") == 0


def test_a_killed_exports_partial_folder_is_removed_by_the_next(tmp_path, tiny, capsys):
    """SIGKILL leaves the temporary folder (a full copy of the weights) behind; the next export to the same output
    removes it and says so. Other hidden folders are not touched."""
    run = write_run(tmp_path / "run", tiny)
    leftover = tmp_path / ".out.k2x9_q7a.partial"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.k2x9_q7a.partial").mkdir()
    assert convert(run, tmp_path / "out") == 0
    assert f"removed {leftover}, the unfinished output of an earlier convert" in capsys.readouterr().out
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == [".other.k2x9_q7a.partial"]


def test_a_refused_export_leaves_no_parent_folders(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    out = tmp_path / "a" / "b" / "out"
    refused(capsys, run, out, "head 'seq2seq' is not one of", head="seq2seq")
    assert not (tmp_path / "a").exists()


def test_the_command_line_exits_non_zero_with_one_line(tmp_path, tiny):
    MegaForCausalLM(MegaConfig(**tiny["model"])).save_pretrained(tmp_path / "hf")
    done = subprocess.run([sys.executable, "-m", "megatron_mega.cli", "convert", str(tmp_path / "hf"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done
    assert done.stderr.strip().count("\n") == 0 and "not a training checkpoint folder" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoints_carry_the_format_version(tmp_path):
    """checkpointing.save stamps the version into the client state (trainer_state.json and DeepSpeed's file)."""

    class Engine:
        def save_checkpoint(self, directory, tag, client_state, save_latest):
            self.client_state = client_state
            os.makedirs(os.path.join(directory, tag))

    import torch.distributed as dist

    engine = Engine()
    barrier = dist.barrier
    dist.barrier = lambda *a, **k: None
    try:
        checkpointing.save(engine, str(tmp_path), 5, {"step": 5}, rank=0, keep_last=0)
    finally:
        dist.barrier = barrier
    assert engine.client_state == {"format_version": checkpointing.FORMAT_VERSION, "step": 5}
    assert checkpointing.read_state(str(tmp_path), "step00000005")["format_version"] == checkpointing.FORMAT_VERSION


# ---- HF directory -> training (checkpoint.init_from_hf) --------------------------------------------------------------

@pytest.fixture()
def hf_dir(tmp_path, tiny):
    path = tmp_path / "hf"
    torch.manual_seed(2)
    MegaForCausalLM(MegaConfig(**tiny["model"])).save_pretrained(path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_good_directory_passes(hf_dir, tiny):
    assert check_hf_directory(str(hf_dir))["model_type"] == "mega"
    edit_config(hf_dir, transformers_version="4.57.6")  # what transformers writes
    state = initial_lm_state(str(hf_dir), MegaConfig(**tiny["model"]), "causal", seed=0)
    assert torch.equal(state["mega.embedding_layer.word_embeddings.weight"],
                       load_file(hf_dir / "model.safetensors")["mega.embedding_layer.word_embeddings.weight"])


def lm_state(path, tiny):
    return initial_lm_state(str(path), MegaConfig(**tiny["model"]), "causal", seed=0)


def test_not_a_mega_directory(tmp_path, hf_dir, tiny):
    edit_config(hf_dir, model_type="bert")
    with pytest.raises(CheckpointError, match=r"config.json: field 'model_type' is 'bert', not 'mega'"):
        lm_state(hf_dir, tiny)
    with pytest.raises(CheckpointError, match="not a directory"):
        lm_state(tmp_path / "nowhere", tiny)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step00000001\n")
    with pytest.raises(CheckpointError, match="no config.json; .*a training checkpoint folder"):
        lm_state(tmp_path / "run", tiny)
    (hf_dir / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not JSON"):
        lm_state(hf_dir, tiny)


@pytest.mark.parametrize("version", ["5.0.0", "3.5.1", "dev"])
def test_an_unknown_transformers_major_version(hf_dir, tiny, version):
    edit_config(hf_dir, transformers_version=version)
    with pytest.raises(CheckpointError, match=rf"field 'transformers_version' is '{version}'.*format is unknown"):
        lm_state(hf_dir, tiny)


def test_weights_of_another_framework(hf_dir, tiny):
    tensors = load_file(hf_dir / "model.safetensors")
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "tf"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: metadata field 'format' is 'tf', not 'pt'"):
        lm_state(hf_dir, tiny)
    save_file(tensors, str(hf_dir / "model.safetensors"))  # no metadata at all: torch's own files, accepted
    assert torch.equal(lm_state(hf_dir, tiny)["mega.layers.0.mega_layer.ema_gate.damping_factor"],
                       tensors["mega.layers.0.mega_layer.ema_gate.damping_factor"])
    (hf_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lm_state(hf_dir, tiny)


def test_missing_shards_and_weights(hf_dir, tiny):
    model = MegaForCausalLM.from_pretrained(hf_dir)
    (hf_dir / "model.safetensors").unlink()
    model.save_pretrained(hf_dir, max_shard_size=20_000)
    shards = sorted(p.name for p in hf_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert torch.equal(lm_state(hf_dir, tiny)["lm_head.bias"], model.lm_head.bias)
    (hf_dir / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: lists shard {shards[1]}, which is "
                                              rf"missing"):
        lm_state(hf_dir, tiny)
    for name in shards + ["model.safetensors.index.json"]:
        if (hf_dir / name).exists():
            (hf_dir / name).unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        lm_state(hf_dir, tiny)


def test_weights_under_other_names_are_refused(hf_dir, tiny):
    """A file whose tensors are all renamed (a foreign checkpoint with a MEGA config) would otherwise start training
    from the seeded initialisation with only a warning."""
    tensors = load_file(hf_dir / "model.safetensors")
    save_file({"encoder." + k: v for k, v in tensors.items()}, str(hf_dir / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="the weights lack .* of the MEGA model's own tensors"):
        lm_state(hf_dir, tiny)


def test_a_mismatched_architecture_names_file_and_fields(hf_dir, tiny):
    edit_config(hf_dir, hidden_size=48)
    with pytest.raises(CheckpointError, match=r"architecture differs .* hidden_size \(48 there, 32 here\)"):
        lm_state(hf_dir, tiny)
    edit_config(hf_dir, hidden_size=32, chunk_size=0)
    with pytest.raises(CheckpointError, match="config.json: "):
        lm_state(hf_dir, tiny)


# ---- the training command meets the same refusals before anything starts ---------------------------------------------

def train_command(pydoc_dataset, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_mega.training.commands", "--config", TINY,
                           f"data.paths=[{pydoc_dataset['dataset']}]", f"tokenizer={pydoc_dataset['tokenizer']}",
                           *overrides], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_train_from_a_non_mega_directory_is_one_line(tmp_path, tiny, hf_dir, pydoc_dataset):
    edit_config(hf_dir, model_type="bert")
    done = train_command(pydoc_dataset, f"checkpoint.dir={tmp_path / 'ck'}", f"checkpoint.init_from_hf={hf_dir}",
                         "optim.train_steps=0")
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert lines == [f"megatron-mega: error: checkpoint.init_from_hf: {hf_dir}/config.json: field 'model_type' is "
                     f"'bert', not 'mega'; not a MEGA model"], done.stderr
    assert not (tmp_path / "ck").exists()


def test_resuming_a_newer_format_is_one_line(tmp_path, tiny, pydoc_dataset):
    run = write_run(tmp_path / "ck", tiny, format_version=checkpointing.FORMAT_VERSION + 1)
    done = train_command(pydoc_dataset, f"checkpoint.dir={run}", "optim.train_steps=4")
    assert done.returncode == 2, done
    assert "trainer_state.json: field 'format_version' is 2, newer than" in done.stderr, done.stderr
    assert sorted(os.listdir(run)) == ["latest", "step00000003"]


def test_resuming_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, pydoc_dataset):
    run = tmp_path / "ck"
    (run / "step00000003").mkdir(parents=True)
    (run / "latest").write_text("step00000003\n")
    done = train_command(pydoc_dataset, f"checkpoint.dir={run}", "optim.train_steps=4")
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"megatron-mega: error: {run}/step00000003/trainer_state.json: missing; {run}/step00000003 "
                         f"is not a checkpoint written by this trainer"), done.stderr
    assert "Traceback" not in done.stderr


def test_resuming_with_another_architecture_is_one_line(tmp_path, tiny, pydoc_dataset):
    """A changed model field used to surface as DeepSpeed's 30-line size-mismatch traceback (or, for a field that
    keeps the shapes, as a silently different model)."""
    run = write_run(tmp_path / "ck", tiny)
    for override, field in (("model.hidden_size=48", "model.hidden_size: 48 here, 32 in the checkpoint"),
                            ("model.attention_activation=laplace", "model.attention_activation: 'laplace' here, "
                                                                    "'softmax' in the checkpoint")):
        done = train_command(pydoc_dataset, f"checkpoint.dir={run}", "optim.train_steps=4", override)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"megatron-mega: error: {field} ({run}/step00000003); a run resumes with the model it saved" in \
            done.stderr, done.stderr


def test_the_datasets_tokenizer_ships_when_the_config_names_none(tmp_path, tiny, pydoc_dataset, capsys):
    """A run configured without `tokenizer:` (tiny.yaml) used to convert to a directory without a tokenizer, and
    fine-tuning it then failed; the prepared dataset keeps the tokenizer the run recorded the sha256 of."""
    from megatron_mega.data.tokenizer import Tokenizer

    sha = Tokenizer.load(pydoc_dataset["tokenizer"]).sha256
    config = {**tiny, "data": {**tiny["data"], "paths": [pydoc_dataset["dataset"]]}}
    run = write_run(tmp_path / "run", tiny, config=config, tokenizer_sha256=sha)
    assert convert(run, tmp_path / "out") == 0
    assert "no tokenizer shipped" not in capsys.readouterr().out
    assert Tokenizer.load(tmp_path / "out").sha256 == sha
    # another tokenizer's dataset is not taken for it: nothing shipped, and said so
    other = write_run(tmp_path / "other", tiny, config=config, tokenizer_sha256="ab" * 32)
    assert convert(other, tmp_path / "out2") == 0
    assert "no tokenizer shipped" in capsys.readouterr().out
    assert not (tmp_path / "out2" / "tokenizer.model").exists()


def test_an_encoder_with_a_causal_ema_is_no_causal_lm_unless_asked(tmp_path, tiny, capsys):
    """objective mlm with bidirectional false and is_decoder false trains an encoder whose attention reads the future;
    only the EMA's direction was checked, so `--head causal-lm` wrote a MegaForCausalLM with is_decoder false."""
    from megatron_mega import MegaForMaskedLM

    model_config = {**tiny["model"], "is_decoder": False, "bidirectional": False}
    torch.manual_seed(2)
    encoder = MegaForMaskedLM(MegaConfig(**model_config))
    with torch.no_grad():
        encoder.mlm_head.bias.normal_()
    run = write_run(tmp_path / "run", tiny, model=encoder, config={**tiny, "objective": "mlm", "model": model_config})
    refused(capsys, run, tmp_path / "causal", "attention is not causal (is_decoder false)", head="causal-lm")
    assert convert(run, tmp_path / "causal", head="causal-lm", bidirectional_to_causal=True) == 0
    causal = MegaForCausalLM.from_pretrained(tmp_path / "causal")
    assert causal.config.is_decoder and torch.equal(causal.lm_head.bias, encoder.mlm_head.bias)


def test_a_truncated_module_file_and_a_bad_shard_size_are_one_line(tmp_path, tiny, capsys):
    run = write_run(tmp_path / "run", tiny)
    refused(capsys, run, tmp_path / "out", "--max-shard-size 'lots': use bytes or a size", max_shard_size="lots")
    path = os.path.join(run, "step00000003", "mp_rank_00_model_states.pt")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    refused(capsys, run, tmp_path / "out", "mp_rank_00_model_states.pt: cannot be read (",
            "damaged or incomplete (convert an earlier step with --step)")


def test_resuming_a_damaged_checkpoint_is_one_line(tmp_path, tiny, pydoc_dataset):
    run = write_run(tmp_path / "ck", tiny)
    path = os.path.join(run, "step00000003", "mp_rank_00_model_states.pt")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    done = train_command(pydoc_dataset, f"checkpoint.dir={run}", "optim.train_steps=4")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"megatron-mega: error: {run}/step00000003: a file cannot be read (" in done.stderr, done.stderr


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, pydoc_dataset):
    """A rank that cannot write its part of a checkpoint (here a file stands where a folder must go; a full disk
    reads "basic_ios::clear: iostream error" from torch) stops with what it was writing, exit code 1."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    done = train_command(pydoc_dataset, f"checkpoint.dir={blocker}/ck", "optim.train_steps=1")
    assert done.returncode == 1, done.stderr
    line = [l for l in done.stderr.splitlines() if l.startswith("megatron-mega: training stopped: ")]
    assert line and f"rank 0 could not write its part of checkpoint {blocker}/ck/step00000001" in line[0], \
        done.stderr


def test_special_ids_that_disagree_with_the_datas_tokenizer_are_refused(tmp_path, pydoc_dataset):
    """Only the vocabulary size was checked: a config whose pad/bos/eos ids were not the tokenizer's trained and
    converted into a config.json naming the wrong tokens (and fine-tuning then padded with the wrong id)."""
    done = train_command(pydoc_dataset, f"checkpoint.dir={tmp_path / 'ck'}", "optim.train_steps=1",
                         "model.pad_token_id=5")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert ("megatron-mega: error: model.pad_token_id: 5, but the data's tokenizer has pad_id 1; set "
            "model.pad_token_id=1") in done.stderr, done.stderr
