"""The stop rule and the verdict: targets, tolerance, AUC band, over-unlearning reported as failure."""
import pytest

from dsunlearn.config import ConfigError, load_run_config
from dsunlearn.eval.runner import stop_rule_holds, target_loss, verdict


def _result(forget, approx, auc=0.5):
    r = {"splits": {"forget": {"loss": forget}, "approximate": {"loss": approx}}, "forget_gap": forget - approx,
         "mia": {"loss": {"auc": auc}}}
    return r


def _with_target(cfg, result, before, retrained=None):
    t = target_loss(cfg, result, before, retrained)
    result["target"], result["target_gap"] = t, result["splits"]["forget"]["loss"] - t
    return result


def test_targets():
    before, retrained = _result(4.0, 5.1), _result(5.2, 5.05)
    now = _result(5.0, 5.7)
    cfg = load_run_config(None, ["eval.stop_tolerance=0.15"])
    assert target_loss(cfg, now, before, retrained) == 5.1  # default: the ORIGINAL model's approximate loss
    cfg = load_run_config(None, ["eval.stop_target=current_approximate"])
    assert target_loss(cfg, now, before, retrained) == 5.7
    cfg = load_run_config(None, ["eval.stop_target=retrained_forget", "eval.retrained_model=/x"])
    assert target_loss(cfg, now, before, retrained) == 5.2
    with pytest.raises(ConfigError, match="needs eval.retrained_model"):
        load_run_config(None, ["eval.stop_target=retrained_forget"])


def test_rule_tolerance_band_and_verdicts():
    before = _result(4.0, 5.1)
    cfg = load_run_config(None, ["eval.stop_tolerance=0.1"])
    close = _with_target(cfg, _result(5.05, 5.6), before)
    assert stop_rule_holds(close, cfg) and verdict(close, cfg).startswith("forgotten")
    under = _with_target(cfg, _result(4.8, 5.5), before)
    assert not stop_rule_holds(under, cfg) and verdict(under, cfg).startswith("not yet forgotten")
    over = _with_target(cfg, _result(6.0, 6.1), before)
    assert not stop_rule_holds(over, cfg) and verdict(over, cfg).startswith("FAILURE: over-unlearned")
    # With the AUC band the rule also needs the LOSS attack near chance.
    cfg = load_run_config(None, ["eval.stop_tolerance=0.1", "eval.stop_auc_band=0.05"])
    assert not stop_rule_holds(_with_target(cfg, _result(5.05, 5.6, auc=0.7), before), cfg)
    assert stop_rule_holds(_with_target(cfg, _result(5.05, 5.6, auc=0.52), before), cfg)
    # Tolerance 0 disables the rule.
    cfg = load_run_config(None, [])
    assert not stop_rule_holds(_with_target(cfg, _result(5.1, 5.6), before), cfg)
