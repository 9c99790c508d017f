"""Atomic writes leave the modes a plain open() or mkdir() would: readable by the team under the usual umask."""

import os
import stat

import pytest

from megatron_mega.atomic_io import atomic_directory, atomic_write_text, atomic_write_with, temporary_beside


@pytest.fixture
def umask():
    def set_umask(value: int) -> None:
        os.umask(value)

    previous = os.umask(0o022)
    os.umask(previous)
    yield set_umask
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                          (0o077, 0o600, 0o700)])
def test_files_and_folders_get_the_umask_modes_not_mkstemps(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == file_mode
    with atomic_directory(tmp_path / "model") as folder:
        atomic_write_text(os.path.join(folder, "config.json"), "{}")
    assert mode(tmp_path / "model") == folder_mode and mode(tmp_path / "model" / "config.json") == file_mode
    assert mode(temporary_beside(tmp_path / "b.npy")) == file_mode


def test_a_prepared_dataset_is_readable_by_others(tmp_path, umask):
    """What a data team prepares, a training account reads: manifest, tokenizer files, shards, index caches."""
    from tests.data.fixtures import make_manifest, random_documents

    umask(0o022)
    root = make_manifest(tmp_path / "ds", random_documents(20))
    from megatron_mega.data.builder import build_datasets
    from megatron_mega.data.config import DataConfig

    build_datasets(DataConfig(paths=[root], seq_len=8, split="1"), {"train": 10}, tokenizer_sha256=None)
    modes = {os.path.relpath(os.path.join(d, f), root): mode(os.path.join(d, f))
             for d, _, files in os.walk(root) for f in files if not f.endswith(".lock")}
    assert any(name.startswith("index-cache") for name in modes)
    assert {name: m for name, m in modes.items() if m & 0o044 != 0o044} == {}


def test_a_rewrite_makes_a_new_file_with_a_new_files_mode(tmp_path, umask):
    """Outputs written 0600 by earlier versions become readable when rewritten (a resumed tokenize, `latest`)."""
    umask(0o022)
    target = tmp_path / "latest"
    target.write_text("step1")
    os.chmod(target, 0o600)
    atomic_write_text(target, "step2")
    assert mode(target) == 0o644 and target.read_text() == "step2"


def test_a_writer_that_makes_the_file_anew_still_gets_the_usual_mode(tmp_path, umask):
    """safetensors' save_file replaces the temporary with a 0600 file of its own: a converted model's weights were
    unreadable to anyone but their writer."""
    import torch
    from safetensors.torch import save_file

    umask(0o022)
    atomic_write_with(tmp_path / "model.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
    assert mode(tmp_path / "model.safetensors") == 0o644
