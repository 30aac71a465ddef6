"""The registry, its shipped example configs and its docs agree: every method has a citation, a docs section with
its run command, and a config that loads and builds it; every shipped config loads and builds its method."""
from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from dsunlearn.config import MethodConfig, load_run_config
from dsunlearn.methods import METHODS, build_method

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "dsunlearn" / "configs"
DOCS = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
STUDY = {"ga": ("ga", "retain"), "random_labels": ("random_labels", "retain"),
         "adversarial_labels": ("adversarial_labels", "retain"), "ga_gd": ("ga_gd", "retain"),
         "ga_kl": ("ga_kl", "retain"), "ga_gd_general": ("ga_gd", "general"), "ga_kl_general": ("ga_kl", "general")}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_method(path):
    cfg = load_run_config(str(path))
    method = build_method(cfg.method)
    assert type(method) is METHODS[cfg.method.name]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_citation_docs_and_config(name):
    cls = METHODS[name]
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", cls.citation), cls.citation
    assert sys.modules[cls.__module__].__doc__.strip(), name
    assert Path(sys.modules[cls.__module__].__file__).stem == name  # registry key = file name
    assert f"## `{name}`" in DOCS
    assert f"--config dsunlearn/configs/{name}.json --zero ds_configs/zero3.json" in DOCS
    assert load_run_config(str(CONFIGS / f"{name}.json")).method.name == name
    method = build_method(MethodConfig(name=name))
    assert set(method.streams) >= set(method.reference) | set(getattr(method, "precomputed", {}))
    assert set(getattr(method, "default_weights", {})) <= set(method.term_names)


def test_the_studys_seven_map_to_shipped_configs():
    for config, (name, retain_source) in STUDY.items():
        cfg = load_run_config(str(CONFIGS / f"{config}.json"))
        assert (cfg.method.name, cfg.data.retain_source) == (name, retain_source), config
        assert f"dsunlearn/configs/{config}.json" in DOCS


def test_paper_defaults_are_documented_fields():
    """Every hyperparameter is a dataclass field with a docstring (the house style's "paper defaults as fields")."""
    import ast
    import inspect
    for name, cls in METHODS.items():
        tree = ast.parse(inspect.getsource(cls)).body[0].body
        documented = {node.target.id for node, nxt in zip(tree, tree[1:])
                      if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)}
        assert {f.name for f in fields(cls)} <= documented, name
