"""The console entry point: the demo works end to end; bad input gets one clear message and exit code 2."""

import subprocess
import sys
from pathlib import Path

from megatron_mega import MEGA_HEADS
from megatron_mega.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "model" / "tiny.yaml")


def test_demo_saves_and_loads_all_six_heads(tmp_path, capsys):
    assert main(["demo", "--config", TINY, "--output-dir", str(tmp_path), "model.num_hidden_layers=1"]) == 0
    printed = capsys.readouterr().out
    for cls in MEGA_HEADS.values():
        assert cls.__name__ in printed
    assert "reload reproduces logits exactly: True" in printed
    assert (tmp_path / "causal-lm" / "model.safetensors").exists()


def test_bad_override_names_the_field(tmp_path, capsys):
    code = main(["model-info", "--config", TINY, "model.use_chunking=true", "model.chunk_size=0"])
    assert code == 2
    assert "chunk_size" in capsys.readouterr().err


def test_unknown_field_and_bad_yaml(tmp_path, capsys):
    assert main(["model-info", "--config", TINY, "model.hiden_size=3"]) == 2
    assert "hiden_size" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n   vocab_size: 3\n")
    assert main(["model-info", "--config", str(bad)]) == 2
    assert "line 3" in capsys.readouterr().err


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "megatron_mega.cli", "model-info", "--config", TINY],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert '"model_type": "mega"' in result.stdout and "parameters:" in result.stdout


def test_the_default_config_is_found_from_anywhere_and_overrides_must_be_model_fields(tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default was a path relative to the repository
    assert main(["model-info"]) == 0 and "parameters:" in capsys.readouterr().out
    for override in ("hidden_size=64", "foo.bar=1"):  # silently ignored before
        assert main(["model-info", override]) == 2
        assert f"override '{override}': these commands read the model section only" in capsys.readouterr().err
