import json

import pytest

from dsunlearn.config import ConfigError, RunConfig, apply_overrides, from_dict, load_run_config, to_dict
from dsunlearn.zero import reference_config, resolve


def test_round_trip_defaults_and_custom(tmp_path):
    cfg = load_run_config(None, ["train.lr=3e-4", "method.name=ga", "train.betas=[0.8,0.95]"])
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_dict(cfg)))
    assert load_run_config(str(path)) == cfg


def test_set_parses_and_types_values():
    cfg = load_run_config(None, ["train.lr=1e-5", "train.num_steps=7", "model.trust_remote_code=true",
                                 "eval.max_chunks=null", "model.path=123", "train.epochs=2",
                                 "method.weights={\"forget\": 0.5}"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.num_steps == 7 and isinstance(cfg.train.num_steps, int)
    assert cfg.model.trust_remote_code is True
    assert cfg.eval.max_chunks is None
    assert cfg.model.path == "123"  # a string field keeps the text even when it looks like a number
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.method.weights == {"forget": 0.5}


@pytest.mark.parametrize("override, fragment", [
    ("train.num_steps=1.5", "train.num_steps: expected int"),
    ("train.lr=fast", "train.lr: expected float"),
    ("model.trust_remote_code=1", "expected bool"),
    ("train.learning_rate=1", "unknown key 'learning_rate'; valid keys: activation_checkpointing, betas, epochs"),
    ("trainer.lr=1", "unknown key 'trainer'"),
    ("train.schedule=linear", "train.schedule"),
    ("noequals", "expected section.key=value"),
])
def test_bad_overrides_fail_with_the_field(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"lr": 1e-4, "stepz": 3}}))
    with pytest.raises(ConfigError) as e:
        load_run_config(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'stepz'" in msg and "num_steps" in msg


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{\n "train": {"lr": 1e-4,}\n}')
    with pytest.raises(ConfigError, match=r"run.json: not valid JSON .* line 2"):
        load_run_config(str(path))


def _zero(**extra):
    return {"zero_optimization": {"stage": 3}, **extra}


def test_zero_auto_keys_are_filled_from_the_run_config():
    cfg = load_run_config(None, ["train.micro_batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5"])
    out = resolve(_zero(train_micro_batch_size_per_gpu="auto", gradient_clipping="auto"), cfg, world_size=4)
    assert out["train_micro_batch_size_per_gpu"] == 3
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 24
    assert out["gradient_clipping"] == 0.5
    # An equal concrete value is no conflict.
    assert resolve(_zero(train_batch_size=24), cfg, world_size=4)["train_batch_size"] == 24


@pytest.mark.parametrize("key, value, fragment", [
    ("train_micro_batch_size_per_gpu", 8, "train_micro_batch_size_per_gpu=8 conflicts with the run config "
                                          "(train.micro_batch_size gives 3)"),
    ("gradient_accumulation_steps", 4, "gradient_accumulation_steps=4 conflicts"),
    ("train_batch_size", 100, "train_batch_size=100 conflicts"),
    ("gradient_clipping", 2.0, "gradient_clipping=2.0 conflicts"),
])
def test_zero_conflicts_name_both_values(key, value, fragment):
    cfg = load_run_config(None, ["train.micro_batch_size=3"])
    with pytest.raises(ConfigError) as e:
        resolve(_zero(**{key: value}), cfg, world_size=2, source="ds_configs/x.json")
    assert fragment in str(e.value) and "ds_configs/x.json" in str(e.value)


def test_zero_rejects_optimizer_section_and_global_batch_mismatch():
    cfg = load_run_config(None, [])
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        resolve(_zero(optimizer={"type": "AdamW"}), cfg, world_size=1)
    with pytest.raises(ConfigError, match="remove the 'activation_checkpointing' section: set train.activation_chec"):
        resolve(_zero(activation_checkpointing={"partition_activations": True}), cfg, world_size=1)
    cfg = load_run_config(None, ["train.global_batch_size=16", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"global_batch_size=16 .* = 4"):
        resolve(_zero(), cfg, world_size=2)


def test_reference_config_keeps_sharding_and_drops_optimizer_offload():
    cfg = load_run_config(None, [])
    trained = resolve({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "stage3_param_persistence_threshold": 0}},
        cfg, world_size=2)
    ref = reference_config(trained)
    assert ref["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ref["bf16"] == {"enabled": True} and "optimizer" not in ref
    assert reference_config(resolve({"zero_optimization": {"stage": 2}}, cfg, 1))["zero_optimization"] == {"stage": 0}
