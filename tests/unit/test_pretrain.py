"""`dsunlearn pretrain` is deterministic from its seed: the demo pair's "one command that reproduces it bit for bit"."""
import json
import shutil

import torch

from dsunlearn.config import load_run_config
from dsunlearn.pretrain import pretrain
from helpers import CPU_ZERO3


def test_pretrain_from_scratch_is_bit_reproducible(toy_world, tmp_path):
    arch = tmp_path / "arch"
    shutil.copytree(toy_world["model"], arch)
    (arch / "model.safetensors").unlink()  # architecture only: init "random" builds it from config.json
    weights = []
    for name in ("a", "b"):
        cfg = load_run_config(None, [f"model.path={arch}", "model.init=random", f"data.train={toy_world['retain']}",
                                     "data.seq_len=64", "train.num_steps=4", "train.micro_batch_size=4",
                                     "train.lr=3e-3", f"output.run_dir={tmp_path / name}"])
        assert pretrain(cfg, CPU_ZERO3) == 0
        from safetensors.torch import load_file
        weights.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
        log = [json.loads(l) for l in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert log[-1]["loss/train"] < log[0]["loss/train"]  # it learns
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
