"""The stop rule, the verdict and the exported step (eval/verdict.py, eval/runner.py), on scripted evaluations."""
import math

import pytest
import torch

from dsunlearn import engine as E
from dsunlearn.config import ConfigError, load_run_config
from dsunlearn.eval import runner
from dsunlearn.eval.runner import Evaluator, stop_rule_holds, target_loss
from dsunlearn.eval.verdict import (CANNOT_JUDGE, FORGOTTEN, NOT_FORGOTTEN, OVER_UNLEARNED, distance_to_retraining,
                                    forget_quality, judge, null_auc_band, privleak, verdict_line)
from dsunlearn.rundir import RunLogger

N = 64  # chunks per split: the null band is 2 * sqrt(129 / (12 * 64 * 64)) = 0.10247


def _result(forget, approx=5.1, retain=4.6, aucs=None, chunk_loss=None):
    aucs = aucs or {"loss": 0.5, "min_k_10": 0.5, "ref": 0.5}
    r = {"splits": {name: {"loss": loss, "accuracy": 0.1, "num_chunks": N}
                    for name, loss in (("forget", forget), ("approximate", approx), ("retain", retain))},
         "forget_gap": forget - approx, "mia": {k: {"auc": v} for k, v in aucs.items()},
         "chunk_loss": {"forget": chunk_loss or [forget] * 3}}
    return r


def _with_target(cfg, result, before, retrained=None):
    t = target_loss(cfg, result, before, retrained)
    result["target"], result["target_gap"] = t, result["splits"]["forget"]["loss"] - t
    return result


def _judge(result, before, twin=None, tol=0.1, utility=0.03, band=None, split_check=None):
    return judge(result, before, twin, stop_tolerance=tol, utility_tolerance=utility, auc_band=band,
                 split_check=split_check)


BEFORE = _result(4.0, aucs={"loss": 0.9, "min_k_10": 0.95, "ref": 0.97})


def test_targets():
    before, retrained = _result(4.0, 5.1), _result(5.2, 5.05)
    now = _result(5.0, 5.7)
    cfg = load_run_config(None, ["eval.stop_tolerance=0.15", "eval.every_n_steps=5"])
    assert target_loss(cfg, now, before, retrained) == 5.1  # default: the ORIGINAL model's approximate loss
    cfg = load_run_config(None, ["eval.stop_target=current_approximate"])
    assert target_loss(cfg, now, before, retrained) == 5.7
    cfg = load_run_config(None, ["eval.stop_target=retrained_forget", "eval.retrained_model=/x"])
    assert target_loss(cfg, now, before, retrained) == 5.2
    with pytest.raises(ConfigError, match="needs eval.retrained_model"):
        load_run_config(None, ["eval.stop_target=retrained_forget"])


def test_the_base_model_moves_the_target_by_its_natural_gap_and_sets_the_attack_levels():
    """eval.base_model (the model before the forget set): target = L_approx(original) + L_forget(base) -
    L_approx(base); without a twin its strongest attack is the unseen-like level, with a twin the twin's stays."""
    before, base = _result(4.0, 5.1), _result(3.3, 3.5, aucs={"loss": 0.58, "min_k_10": 0.6, "ref": 0.5})
    cfg = load_run_config(None, ["eval.base_model=/base"])
    assert target_loss(cfg, _result(5.0), before, None, base=base) == pytest.approx(5.1 + (3.3 - 3.5))
    now = _result(4.95, aucs={"loss": 0.6, "min_k_10": 0.7})
    now["target"] = target_loss(cfg, now, before, None, base=base)
    # The forget text is easier by nature: 4.95 is at the moved target 4.9, short of the unmoved 5.1 - 0.1.
    band = null_auc_band(N, N)
    j = _judge(now, before, twin=base)
    assert j["figures"]["unseen_like_high"] == pytest.approx(0.6 + band) and j["ok"], j["reasons"]
    assert not _judge(_with_target(load_run_config(None, []), now, before), before)["ok"]
    with pytest.raises(ConfigError, match="eval.base_model corrects the 'original_approximate' target"):
        load_run_config(None, ["eval.base_model=/base", "eval.stop_target=current_approximate"])


def test_a_rule_that_could_never_run_is_refused():
    with pytest.raises(ConfigError, match="eval.stop_tolerance > 0 needs eval.every_n_steps > 0"):
        load_run_config(None, ["eval.stop_tolerance=0.1"])
    with pytest.raises(ConfigError, match="eval.auc_band"):
        load_run_config(None, ["eval.auc_band=0.7"])


def test_the_stop_rule_is_a_one_sided_crossing():
    cfg = load_run_config(None, ["eval.stop_tolerance=0.1", "eval.every_n_steps=5"])
    assert not stop_rule_holds(_with_target(cfg, _result(4.9), BEFORE), cfg)   # 0.2 short of 5.1
    assert stop_rule_holds(_with_target(cfg, _result(5.0), BEFORE), cfg)       # within the tolerance below
    assert stop_rule_holds(_with_target(cfg, _result(9.0), BEFORE), cfg)       # far past it: still stops
    assert not stop_rule_holds(_with_target(load_run_config(None, []), _result(9.0), BEFORE),
                               load_run_config(None, []))                     # tolerance 0: the rule is off


def test_verdict_criteria_with_numbers():
    cfg = load_run_config(None, [])
    at = _with_target(cfg, _result(5.05, 5.15, 4.65), BEFORE)
    j = _judge(at, BEFORE)
    assert j["status"] == FORGOTTEN and j["ok"] and j["distance"] == 0
    assert verdict_line(j).startswith("forgotten: forget loss 5.050 at the target 5.100; strongest attack")
    # Short of the target.
    j = _judge(_with_target(cfg, _result(4.8), BEFORE), BEFORE)
    assert j["status"] == NOT_FORGOTTEN and j["reasons"] == ["forget loss 4.800 below the target 5.100 (-0.300 nats)"]
    assert j["distance"] == pytest.approx(0.2)
    # At the target, but an attack still separates (the band: two null sd at 64 + 64 chunks).
    band = 2 * math.sqrt(129 / (12 * 64 * 64))
    j = _judge(_with_target(cfg, _result(5.1, aucs={"loss": 0.6, "min_k_10": 0.89}), BEFORE), BEFORE)
    assert j["status"] == NOT_FORGOTTEN
    assert j["reasons"] == [f"forget loss at target, but Min-K% (k=10) still separates forget from unseen text: AUC "
                            f"0.890, unseen-like is <= {0.5 + band:.3f}"]
    # Over-unlearned: utility lost, and the forget set now harder than unseen text.
    j = _judge(_with_target(cfg, _result(7.0, 5.2, 5.05, aucs={"loss": 0.1, "min_k_10": 0.3}), BEFORE), BEFORE)
    assert j["status"] == OVER_UNLEARNED and not j["ok"]
    assert j["reasons"] == [f"the LOSS attack ranks forget chunks as harder than unseen text: AUC 0.100, unseen-like is >= "
                            f"{0.5 - band:.3f}", "retain +0.450 nats (+9.8%, tolerance 3%)"]
    assert verdict_line(j) == "over-unlearned: " + "; ".join(j["reasons"])


def test_the_auc_band_follows_the_twin_and_the_set_sizes():
    cfg = load_run_config(None, [])
    assert null_auc_band(64, 64) == pytest.approx(2 * math.sqrt(129 / (12 * 64 * 64)))
    assert null_auc_band(10_000, 10_000) == 0.05  # the floor
    # With a twin the unseen-like level is its strongest attack, its own reference attack left out (0.5 by
    # construction there: it is calibrated by the twin itself).
    twin = _result(5.2, aucs={"loss": 0.46, "min_k_10": 0.56, "ref": 0.5})
    now = _with_target(cfg, _result(5.1, aucs={"loss": 0.55, "min_k_10": 0.62, "ref": 0.6}), BEFORE)
    j = _judge(now, BEFORE, twin=twin, band=0.05)
    assert j["figures"]["unseen_like_high"] == pytest.approx(0.61)
    assert j["status"] == NOT_FORGOTTEN and "AUC 0.620, unseen-like is <= 0.610" in j["reasons"][0]
    assert _judge(now, BEFORE, twin=twin, band=0.07)["ok"]


def test_a_state_that_already_fails_the_rule_cannot_be_judged():
    cfg = load_run_config(None, [])
    # The smollm case: the forget set was already above the target before the first step.
    before = _result(5.3, 5.1)
    after = _with_target(cfg, _result(5.6, 5.1), before)
    j = _judge(after, before)
    assert j["status"] == CANNOT_JUDGE and not j["ok"] and "already at or above the target 5.100" in j["reasons"][0]
    assert verdict_line(j).startswith("cannot judge: before unlearning the forget loss 5.300")
    j = _judge(_with_target(cfg, _result(5.1), BEFORE), BEFORE, split_check={"passed": False, "reasons": ["blind"]})
    assert j["status"] == CANNOT_JUDGE and "split check failed" in j["reasons"][0]


def test_privleak_and_forget_quality_by_hand():
    assert privleak(0.9, 0.6) == pytest.approx(0.5)    # (0.9 - 0.6) / 0.6
    assert privleak(0.3, 0.5) == pytest.approx(-0.4)   # over-unlearned: negative
    # Two fully separated samples of 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1.
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    twin = _result(5.2, aucs={"loss": 0.45, "min_k_10": 0.6, "ref": 0.5}, chunk_loss=[4.0, 5.0, 6.0])
    now = _result(5.0, aucs={"loss": 0.7, "min_k_10": 0.9, "ref": 0.8}, chunk_loss=[1.0, 2.0, 3.0])
    d = distance_to_retraining(now, twin)
    assert d["privleak_attack"] == "min_k_10" and d["privleak"] == pytest.approx((0.9 - 0.6) / 0.6)
    assert d["privleak_per_attack"]["ref"] == pytest.approx(0.6) and d["forget_quality"] == pytest.approx(0.1)
    assert distance_to_retraining(now, None)["privleak"] == pytest.approx((0.9 - 0.5) / 0.5)


# ------------------------------------------------------------------------------- the Evaluator on scripted results

class _Tok:
    pad_token_id = 0


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """An Evaluator whose evaluations return the given results in order; exports are recorded by step."""
    exports, script, steps = [], [], []
    monkeypatch.setattr(runner, "evaluate_model", lambda *a, **k: script.pop(0))
    monkeypatch.setattr(E, "export_hf_model", lambda *a, **k: exports.append(steps[-1]))
    cfg = load_run_config(None, ["eval.stop_tolerance=0.1", "eval.every_n_steps=5", "eval.split_check=false",
                                 f"output.run_dir={tmp_path}"])
    ev = Evaluator(cfg, engine=None, tokenizer=_Tok(), logger=RunLogger(str(tmp_path), 0, 0, enabled=False),
                   ds_config={}, run_dir=str(tmp_path), streams={})

    def run(results):
        script.extend(r for _, r in results)
        decisions = []
        for step, _ in results:
            steps.append(step)
            decisions.append(ev.evaluate(step, label=f"step {step}"))
        return decisions
    return ev, run, exports


def test_an_overshoot_stops_at_the_crossing_and_exports_the_best_evaluated_step(scripted):
    ev, run, exports = scripted
    over = _result(7.0, 5.3, 5.2, aucs={"loss": 0.1, "min_k_10": 0.2})   # far past the target: wrecked
    decisions = run([(0, BEFORE), (5, _result(4.95, 5.12, 4.62)), (10, over)])
    # The old |gap| <= tolerance rule never stopped here (gaps -0.15 and +1.9): the crossing does, at step 10.
    assert decisions == [None, None, "stop"]
    assert ev.best["entry"]["step"] == 5 and exports == [5]
    assert ev.best["result"]["judgement"]["status"] == NOT_FORGOTTEN  # 0.05 short of 5.0: closer than step 10


def test_an_all_overshoot_run_exports_unlearned_weights_and_says_over_unlearned(scripted):
    ev, run, exports = scripted
    over = _result(7.0, 5.3, 5.2, aucs={"loss": 0.1, "min_k_10": 0.2})
    assert run([(0, BEFORE), (5, over)]) == [None, "stop"]
    assert exports == [5]  # step 0, the original, is never the result
    assert verdict_line(ev.best["result"]["judgement"]).startswith("over-unlearned: the LOSS attack ranks forget chunks")


def test_the_best_step_is_chosen_by_the_verdict_criteria_not_the_gap(scripted):
    ev, run, exports = scripted
    # Step 10 crosses with the smaller |gap| (0.02 vs 0.15) but Min-K% still separates; step 5 is 0.05 short of the
    # crossing with every attack at chance: by the verdict's criteria step 5 is closer to retraining.
    near = _result(4.95, 5.12, 4.62, aucs={"loss": 0.5, "min_k_10": 0.55})
    leaky = _result(5.08, 5.12, 4.62, aucs={"loss": 0.6, "min_k_10": 0.9})
    assert run([(0, BEFORE), (5, near), (10, leaky)]) == [None, None, "stop"]
    assert exports == [5] and ev.best["entry"]["step"] == 5
    assert ev.best["result"]["judgement"]["distance"] == pytest.approx(0.05)
    # Once a step meets every criterion it wins over any that does not.
    clean = _result(5.1, 5.12, 4.62, aucs={"loss": 0.5, "min_k_10": 0.55})
    run([(15, clean)])
    assert exports == [5, 15] and ev.best["result"]["judgement"]["status"] == FORGOTTEN


def test_the_twin_never_chooses_the_exported_step(scripted):
    """A twin whose strongest attack sits far from 0.5 (here 0.75) raises the report's unseen-like level: by it the
    leaky step 10 looks forgotten. The step is chosen as without a twin (step 5); the report still judges against
    the twin."""
    ev, run, exports = scripted
    ev.retrained = _result(5.1, 5.12, 4.6, aucs={"loss": 0.6, "min_k_10": 0.75})
    near = _result(4.95, 5.12, 4.62, aucs={"loss": 0.5, "min_k_10": 0.55, "ref": 0.5})
    leaky = _result(5.08, 5.12, 4.62, aucs={"loss": 0.6, "min_k_10": 0.8, "ref": 0.5})
    run([(0, BEFORE), (5, near), (10, leaky)])
    assert exports == [5] and ev.best["entry"]["step"] == 5
    assert ev.history[-1]["judgement"]["status"] == FORGOTTEN  # the report's verdict, against the twin
    assert ev.history[-1]["selection"]["status"] == NOT_FORGOTTEN  # what a user without the twin can judge


def test_a_run_with_nothing_to_remove_stops_before_the_first_step(toy_world, tmp_path, capsys):
    """The forget set is unseen text (the approximate set itself): the evaluation before unlearning cannot judge
    it, so with the stop rule on the run takes no step, exports nothing and exits 4; eval.allow_unjudged trains."""
    import json
    from pathlib import Path
    from dsunlearn.cli import main
    from helpers import CPU_ZERO3, write_run_config
    common = dict(data={"forget": toy_world["approximate"]}, train={"num_steps": 2})
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "run",
                           eval={"every_n_steps": 1, "stop_tolerance": 0.1}, **common)
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) == 4
    run = Path(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["exit_code"] == 4 and not summary["model_exported"]
    assert summary["stop_reason"].startswith("nothing to unlearn by the run's own judgement: cannot judge")
    assert not (run / "model").exists() and not (run / "checkpoints").exists()
    assert not (run / "log.jsonl").is_file() or not (run / "log.jsonl").read_text().strip()  # no step logged
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["verdict"].startswith("cannot judge") and metrics["steps"] == 0
    cfg = write_run_config(tmp_path / "r2.json", toy_world, tmp_path / "run2",
                           eval={"every_n_steps": 1, "stop_tolerance": 0.1, "allow_unjudged": True}, **common)
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) in (0, 3)
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["steps"] >= 1


def test_the_same_run_with_and_without_a_twin_exports_the_same_weights(toy_world, tmp_path):
    """The stop rule on, evaluated at every step; the "twin" is the original model itself (it memorised the forget
    set, so its strongest attack sits far above 0.5 and would widen the unseen-like band). The exported weights
    are bit-identical to those of the run without it; only the report differs."""
    import json
    from safetensors.torch import load_file
    from dsunlearn.cli import main
    from helpers import CPU_ZERO3, write_run_config
    runs = {}
    for name, twin in (("alone", None), ("twin", toy_world["model"])):
        cfg = write_run_config(tmp_path / f"{name}.json", toy_world, tmp_path / name, train={"num_steps": 6},
                               eval={"every_n_steps": 1, "stop_tolerance": 0.1, "allow_unjudged": True,
                                     "retrained_model": twin})
        assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) in (0, 3)
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["alone"]["exported_step"] == runs["twin"]["exported_step"]
    assert runs["twin"]["retrained"] is not None and runs["alone"]["retrained"] is None
    want, got = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("alone", "twin"))
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_selection_and_report_parts_are_disjoint_documents_and_seeded():
    from dsunlearn.eval.runner import REPORT, SELECTION, EvalSplit, document_parts, part_sizes
    docs = [d for d in range(10) for _ in range(d % 3 + 1)]  # 10 documents of 1-3 chunks
    splits = {"forget": EvalSplit("forget", [[1]] * len(docs), [""] * len(docs), docs),
              "forget@1": EvalSplit("forget@1", [[1]] * len(docs), [""] * len(docs), docs),
              "one": EvalSplit("one", [[1]] * 3, [""] * 3, [7, 7, 7])}
    parts = document_parts(splits, 0.5, seed=3)
    sel, rep = parts["forget"][SELECTION], parts["forget"][REPORT]
    assert sorted(sel + rep) == list(range(len(docs))) and not set(sel) & set(rep)
    assert not {docs[i] for i in sel} & {docs[i] for i in rep}  # by document, not by chunk
    assert part_sizes(splits, parts)["forget"][SELECTION]["documents"] == 5
    assert parts["forget@1"] == parts["forget"]  # one file splits the same way under every name
    assert document_parts(splits, 0.5, seed=3) == parts and document_parts(splits, 0.5, seed=4) != parts
    assert parts["one"][SELECTION] == parts["one"][REPORT] == [0, 1, 2]  # one document cannot be cut
    assert document_parts(splits, 0.0, seed=3) is None


def test_the_step_is_chosen_on_one_part_and_reported_on_the_other(toy_world, tmp_path):
    """A real run with the stop rule on: metrics.json's before/after are the report part's figures, the whole
    sets are beside them, the report says which part is which and how large each is. With eval.base_model the base
    is scored on the same parts and moves each part's target by its own gap: here the base is the original itself,
    so the target is the original's own forget loss, part by part."""
    import json
    from dsunlearn.cli import main
    from helpers import CPU_ZERO3, write_run_config
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "run", train={"num_steps": 3},
                           eval={"every_n_steps": 1, "stop_tolerance": 0.1, "allow_unjudged": True,
                                 "base_model": toy_world["model"]})
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) in (0, 3)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sizes = metrics["parts"]["sizes"]["forget"]
    whole = metrics["all_chunks"]["after"]
    assert sizes["selection"]["chunks"] + sizes["report"]["chunks"] == whole["splits"]["forget"]["num_chunks"]
    assert metrics["after"]["splits"]["forget"]["num_chunks"] == sizes["report"]["chunks"]
    assert metrics["after"] == {**whole["parts"]["report"], "judgement": metrics["judgement"],
                                "selection": metrics["selection"]}
    entry = next(h for h in metrics["history"] if h["step"] == metrics["exported_step"])
    assert metrics["after"]["splits"] == entry["parts"]["report"]["splits"]
    assert entry["parts"]["selection"]["splits"] != entry["parts"]["report"]["splits"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "the step was chosen on the selection part (forget " in report and "disjoint report part" in report
    assert metrics["base"]["splits"] == metrics["before"]["splits"]
    for name in ("before", "after"):
        assert metrics[name]["target"] == pytest.approx(metrics["before"]["splits"]["forget"]["loss"])
    whole_before = metrics["all_chunks"]["before"]
    assert whole_before["parts"]["selection"]["target"] == pytest.approx(
        whole_before["parts"]["selection"]["splits"]["forget"]["loss"])
    assert "moved by the base model's forget - approximate gap" in report
