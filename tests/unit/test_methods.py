"""Every method's terms against hand-computed values, one optimizer step on a tiny model per method, the reference
cache against the reference engine, and the precomputed labels. One process, no DeepSpeed: a plain Hugging Face
model stands in for the engine (``engine.forward`` calls it the same way), so the code under test is the real
``loop.fused_forward`` and ``reference.py``."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dsunlearn import loop
from dsunlearn import reference as R
from dsunlearn.config import ConfigError, MethodConfig, RunConfig, from_dict
from dsunlearn.data import load_stream
from dsunlearn.methods import METHODS, build_method, select_trainable, term_weights
from dsunlearn.methods.phased import PhasedMethod
from dsunlearn.methods.base import ReferenceOutputs, StreamOutputs
from dsunlearn.methods.terms import IGNORE_INDEX, chunk_nll, kl_to_reference, reference_distribution

SEQ_LEN = 64
P = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]  # theta's next-token distributions at positions 0, 1, 2
Q = [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3]]  # theta_0's


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two ranks' worth of tests share 2 cores: a second intra-op thread only adds contention for these tiny shapes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _log(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def _stream(labels, probs=P, **kw) -> StreamOutputs:
    labels = torch.tensor(labels)
    logits = torch.stack([_log(probs)] * labels.size(0))
    return StreamOutputs(logits=logits, labels=labels, input_ids=labels.clamp(min=0), **kw)


def _kl(q, p):
    return sum(a * math.log(a / b) for a, b in zip(q, p))


def _logsigmoid(x):
    return -math.log1p(math.exp(-x))


# Two chunks over a vocabulary of 3: chunk A counts positions 0 and 1 (targets 1, 2); chunk B counts position 0 only
# (its target at position 2 is padding).
LABELS = [[0, 1, 2], [2, 2, IGNORE_INDEX]]


# ---------------------------------------------------------------------------------------------------------------------
# Terms by hand

def test_random_and_adversarial_labels_terms_by_hand():
    s = _stream([[0, 1, 2]], extra={"random_labels": torch.tensor([[0, 2, 0]]),
                                    "adversarial_labels": torch.tensor([[0, 0, 1]])})
    assert METHODS["random_labels"]().terms({"forget": s})["forget"].item() == pytest.approx(
        -(math.log(0.1) + math.log(0.1)) / 2)
    assert METHODS["adversarial_labels"]().terms({"forget": s})["forget"].item() == pytest.approx(
        -(math.log(0.7) + math.log(0.6)) / 2)


def test_ga_kl_terms_by_hand_exact_and_topk():
    forget = _stream(LABELS)
    chunk_a = (_kl(Q[0], P[0]) + _kl(Q[1], P[1])) / 2
    chunk_b = _kl(Q[0], P[0])
    q = torch.stack([_log(Q)] * 2)
    retain = _stream(LABELS, reference=ReferenceOutputs(topk_logprobs=q))
    terms = METHODS["ga_kl"]().terms({"forget": forget, "retain": retain})
    assert terms["forget"].item() == pytest.approx(-chunk_nll(forget.logits, forget.labels).mean().item())
    assert terms["retain"].item() == pytest.approx((chunk_a + chunk_b) / 2)

    # k = 1: {top token, everything else}. Row 0: top is token 0 (0.5), rest 0.5 vs theta's 0.7 / 0.3.
    lp, ids, rest = reference_distribution(q, topk=1)
    assert ids[0, :2, 0].tolist() == [0, 1] and rest[0, 0].item() == pytest.approx(math.log(0.5))
    row0 = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    row1 = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)
    top1 = kl_to_reference(retain.logits, retain.labels, lp, ids, rest).item()
    assert top1 == pytest.approx(((row0 + row1) / 2 + row0) / 2)
    assert top1 <= (chunk_a + chunk_b) / 2  # the coarsened KL is a lower bound


def test_npo_terms_by_hand():
    beta = 0.1
    forget = _stream(LABELS)
    lp = [math.log(0.2) + math.log(0.3), math.log(0.1)]
    lp0 = [-3.0, -2.0]
    ref = ReferenceOutputs(seq_logprob=torch.tensor(lp0, dtype=torch.float64))
    forget.reference = ref
    expected = -(2 / beta) * sum(_logsigmoid(-beta * (a - b)) for a, b in zip(lp, lp0)) / 2
    assert METHODS["npo"]().terms({"forget": forget})["forget"].item() == pytest.approx(expected)
    # At theta = theta_0 NPO is (2/beta) log 2 whatever the data.
    forget.reference = ReferenceOutputs(seq_logprob=torch.tensor(lp, dtype=torch.float64))
    assert METHODS["npo"]().terms({"forget": forget})["forget"].item() == pytest.approx(2 / beta * math.log(2))
    with_rt = METHODS["npo"](retain_loss="nll")
    assert with_rt.streams == ("forget", "retain") and set(with_rt.terms({"forget": forget, "retain": forget})) == \
        {"forget", "retain"}


def test_npo_rt_terms_by_hand():
    """NPO-RT (npo, retain_loss="nll"): forget = (2/beta) * mean_i log(1 + (pi(y_i) / pi_0(y_i))^beta) over sequence
    likelihoods, retain = mean over chunks of each chunk's mean token NLL, each on its own stream."""
    beta = 0.5
    forget = _stream(LABELS)
    lp = [math.log(0.2) + math.log(0.3), math.log(0.1)]  # log pi(y): chunk A targets 1, 2; chunk B target 2
    lp0 = [-3.0, -2.0]
    forget.reference = ReferenceOutputs(seq_logprob=torch.tensor(lp0, dtype=torch.float64))
    npo_forget = (2 / beta) * sum(math.log(1 + math.exp(beta * (a - b))) for a, b in zip(lp, lp0)) / 2
    # Retain: theta's distributions Q, chunk A targets 0 then 2, chunk B target 1 (then padding).
    retain = _stream([[1, 0, 2], [0, 1, IGNORE_INDEX]], probs=Q)
    nll_retain = (-(math.log(0.5) + math.log(0.3)) / 2 - math.log(0.3)) / 2
    method = METHODS["npo"](beta=beta, retain_loss="nll")
    terms = method.terms({"forget": forget, "retain": retain})
    assert set(terms) == {"forget", "retain"}
    assert terms["forget"].item() == pytest.approx(npo_forget, rel=1e-12)
    assert terms["retain"].item() == pytest.approx(nll_retain, rel=1e-12)
    # The retain term leaves the forget term alone: plain NPO with the same beta gives the same value.
    assert METHODS["npo"](beta=beta).terms({"forget": forget})["forget"].item() == pytest.approx(npo_forget, rel=1e-12)


def test_simnpo_terms_by_hand():
    beta, gamma = 0.7, 0.5
    forget = _stream(LABELS)
    mean_lp = [(math.log(0.2) + math.log(0.3)) / 2, math.log(0.1)]
    expected = -(2 / beta) * sum(_logsigmoid(-beta * m - gamma) for m in mean_lp) / 2
    terms = METHODS["simnpo"](beta=beta, gamma=gamma).terms({"forget": forget, "retain": forget})
    assert terms["forget"].item() == pytest.approx(expected)
    assert terms["retain"].item() == pytest.approx(chunk_nll(forget.logits, forget.labels).mean().item())


def test_rmu_terms_by_hand():
    rmu = METHODS["rmu"](layer=0, steering_coeff=2.0, control_seed=3)
    cu = rmu.control_vector(2)
    assert cu.norm().item() == pytest.approx(2.0) and (cu >= 0).all()
    assert torch.equal(cu, rmu.control_vector(2)) and not torch.equal(cu, METHODS["rmu"](control_seed=4).control_vector(2))
    labels = torch.tensor([[5, IGNORE_INDEX]])  # one real token: the padded position must not count
    h = torch.tensor([[[1.0, 2.0], [100.0, 100.0]]])
    h0 = torch.tensor([[[1.5, 1.0], [-7.0, 3.0]]])
    logits = torch.zeros(1, 2, 8)
    forget = StreamOutputs(logits=logits, labels=labels, input_ids=labels.clamp(min=0), hidden_states=(h * 0, h))
    retain = StreamOutputs(logits=logits, labels=labels, input_ids=labels.clamp(min=0), hidden_states=(h * 0, h),
                           reference=ReferenceOutputs(hidden=h0))
    terms = rmu.terms({"forget": forget, "retain": retain})
    assert terms["forget"].item() == pytest.approx(((1 - cu[0].item()) ** 2 + (2 - cu[1].item()) ** 2) / 2)
    assert terms["retain"].item() == pytest.approx((0.5 ** 2 + 1.0 ** 2) / 2)
    assert term_weights(rmu, MethodConfig(name="rmu")) == {"forget": 1.0, "retain": 1200.0}


def test_kl_topk_form_properties():
    """Exact at k = vocab, a lower bound non-decreasing in k, 0 at theta = theta_0, finite gradients."""
    torch.manual_seed(0)
    ref_logits = torch.randn(2, 6, 11, dtype=torch.float64) * 2
    logits = (ref_logits + torch.randn_like(ref_logits)).requires_grad_()
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 4:] = IGNORE_INDEX
    exact = kl_to_reference(logits, labels, *reference_distribution(ref_logits))
    values = [kl_to_reference(logits, labels, *reference_distribution(ref_logits, k)).item() for k in range(1, 11)]
    assert values[-1] == pytest.approx(exact.item(), rel=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])) and values[-1] <= exact.item() + 1e-12
    for k in (1, 4, 11):
        assert abs(kl_to_reference(ref_logits, labels, *reference_distribution(ref_logits, k)).item()) < 1e-12
    kl_to_reference(logits, labels, *reference_distribution(ref_logits, 3)).backward()
    assert torch.isfinite(logits.grad).all()


def test_registry_weights_and_params():
    assert term_weights(build_method(MethodConfig(name="simnpo")), MethodConfig(name="simnpo")) == \
        {"forget": 1.0, "retain": 0.1}
    assert term_weights(build_method(MethodConfig(name="simnpo")), MethodConfig(name="simnpo", weights={"retain": 2})) \
        == {"forget": 1.0, "retain": 2.0}
    with pytest.raises(ConfigError, match="unknown term"):
        build_method(MethodConfig(name="npo", weights={"retain": 1.0}))  # plain NPO has no retain term
    assert build_method(MethodConfig(name="npo", params={"retain_loss": "nll"}, weights={"retain": 1.0})).beta == 0.1
    with pytest.raises(ConfigError, match="retain_loss"):
        build_method(MethodConfig(name="npo", params={"retain_loss": "kl"}))
    with pytest.raises(ConfigError, match="beta"):
        build_method(MethodConfig(name="simnpo", params={"beta": 0}))


# ---------------------------------------------------------------------------------------------------------------------
# On a tiny model

@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """The toy world with theta_0 trained ~60 steps on forget + retain, so there is something to forget."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(toy_world["model"])
    cfg = _cfg(toy_world, tmp_path_factory.mktemp("pre"), "ga")
    streams = _streams(toy_world, cfg, tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(toy_world["model"])
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n = streams["forget"].stats.num_chunks
    for step in range(60):
        rows = [(step * 4 + i) % n for i in range(4)]
        batch = {k: torch.cat([streams[s].batch(rows, SEQ_LEN, tok.pad_token_id)[k] for s in ("forget", "retain")])
                 for k in ("input_ids", "attention_mask", "labels")}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chunk_nll(out.logits, batch["labels"]).mean().backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("theta0") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {**toy_world, "model": str(path), "tok": tok, "theta0": model.eval()}


ONE_PHASE_METHODS = {n for n, cls in METHODS.items() if not issubclass(cls, PhasedMethod)}


def _cfg(world, tmp, name, mode="cache", topk=64, seed=42, **params) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"path": world["model"]},
        "data": {k: world[k] for k in ("forget", "retain", "approximate", "general")} | {"seq_len": SEQ_LEN},
        "method": {"name": name, "params": params}, "reference": {"mode": mode, "topk": topk},
        "train": {"micro_batch_size": 4, "seed": seed}, "output": {"run_dir": str(tmp / "run")}})


def _streams(world, cfg, tok, names=("forget", "retain")):
    return {n: load_stream(n, world[n], cfg.data, tok) for n in names}


def _setup(world, tmp, name, mode="cache", topk=64, **params):
    """(method, weights, fresh theta_0 copy with its trainable selection, streams with precomputed fields, reference)."""
    cfg = _cfg(world, tmp, name, mode, topk, **params)
    method = build_method(cfg.method)
    model = copy.deepcopy(world["theta0"])
    select_trainable(model, method)
    streams = _streams(world, cfg, world["tok"], method.streams)
    R.attach_precomputed(cfg, method, model, streams, world["tok"])
    if mode == "engine":
        reference = R.EngineReference(world["theta0"], *R._check_needs(method)) if method.reference else None
    else:
        reference = R.build_reference(cfg, {}, method, model, streams, world["tok"])
    return cfg, method, term_weights(method, cfg.method), model, streams, reference


def _batches(method, streams, tok, rows=(0, 1, 2, 3)):
    return {n: streams[n].batch(list(rows), SEQ_LEN, tok.pad_token_id) for n in method.streams}


def _forward(model, method, batches, reference):
    return loop.fused_forward(model, method, batches, reference)


STEP_CASES = {  # every one-phase method (a loss hook); the phased ones are run end to end in test_phases.py
    "ga": {}, "random_labels": {}, "adversarial_labels": {}, "ga_gd": {}, "ga_kl": {}, "npo": {}, "simnpo": {},
    # The toy model has 2 layers: steer the last one, train both MLP output projections.
    "rmu": {"layer": 1, "trainable_params": r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"},
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_one_step_raises_the_forget_nll(world, tmp_path, name):
    assert set(STEP_CASES) == ONE_PHASE_METHODS
    cfg, method, weights, model, streams, reference = _setup(world, tmp_path, name, **STEP_CASES[name])
    batches = _batches(method, streams, world["tok"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = _forward(model, method, batches, reference)
    terms = method.terms(out)
    sum(weights[k] * v for k, v in terms.items()).backward()
    opt.step()
    with torch.no_grad():
        out2 = _forward(model, method, batches, reference)
    nll = [chunk_nll(o["forget"].logits, o["forget"].labels).mean().item() for o in (out, out2)]
    assert nll[1] > nll[0], (name, nll)
    if name == "rmu":
        assert method.terms(out2)["forget"].item() < terms["forget"].item()  # activations moved toward c * u
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.mark.parametrize("layer, expected", [(0, [0]), (1, [0, 1])])
def test_rmu_trains_the_layers_up_to_its_own_by_default(world, layer, expected):
    """The default trainable set follows ``layer`` (l-2..l), not the paper's fixed 5-7."""
    model = copy.deepcopy(world["theta0"])
    names = select_trainable(model, METHODS["rmu"](layer=layer))
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in expected]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names


@pytest.mark.parametrize("pattern, culprit", [
    (r"model\.layers\.1\.mlp\.down_proj\.weight", "model.layers.1.mlp.down_proj.weight"),  # a later layer
    (r"model\.norm\.weight", "model.norm.weight"),                            # after every layer
])
def test_rmu_refuses_parameters_that_cannot_reach_its_layer(world, pattern, culprit):
    model = copy.deepcopy(world["theta0"])
    with pytest.raises(ConfigError, match=f"{culprit.replace('.', '[.]')} cannot affect the output of layer 0"):
        select_trainable(model, METHODS["rmu"](layer=0, trainable_params=pattern))
    # An input embedding can change every layer's output: allowed.
    select_trainable(model, METHODS["rmu"](layer=0, trainable_params=r"model\.embed_tokens\.weight"))


def test_rmu_last_layer_is_steered_after_the_final_norm(world):
    """The documented convention: hidden_states[layer + 1] is decoder layer ``layer``'s output, except for the last
    layer, where transformers hands back the final norm's output."""
    model = world["theta0"]
    layers = model.model.layers
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[0] if isinstance(o, tuple)
                                                                                      else o))
             for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[3, 4, 5, 6]]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    last = len(layers) - 1
    assert torch.equal(out.hidden_states[1], captured[0])
    assert not torch.allclose(out.hidden_states[last + 1], captured[last])
    with torch.no_grad():
        assert torch.allclose(out.hidden_states[last + 1], model.model.norm(captured[last]))


def test_select_trainable_rejects_a_pattern_that_matches_nothing(world):
    model = copy.deepcopy(world["theta0"])
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_trainable(model, METHODS["rmu"]())  # the paper's layers 5-7 do not exist in a 2-layer model


@pytest.mark.parametrize("name,params", [("npo", {}), ("ga_kl", {}),
                                         ("rmu", {"layer": 0, "trainable_params": r"model\.layers\.0\..*"})])
def test_cache_equals_engine_exactly(world, tmp_path, name, params):
    """The same reference values, bit for bit, at theta_0 and after an update (k = vocab for KL)."""
    _, method, weights, model, streams, cached = _setup(world, tmp_path, name, topk=10 ** 6, **params)
    engine = R.EngineReference(world["theta0"], *R._check_needs(method))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        batches = _batches(method, streams, world["tok"], rows=[4 * step + i for i in range(4)])
        out_c = _forward(model, method, batches, cached)
        with torch.no_grad():
            out_e = _forward(model, method, batches, engine)
        for n in method.reference:
            for f in ("topk_logprobs", "topk_ids", "seq_logprob", "hidden"):
                a, b = getattr(out_c[n].reference, f), getattr(out_e[n].reference, f)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, step, f)
        terms_c, terms_e = method.terms(out_c), method.terms(out_e)
        assert {k: v.item() for k, v in terms_c.items()} == {k: v.item() for k, v in terms_e.items()}
        if name == "ga_kl" and step == 0:
            assert terms_c["retain"].item() == 0.0  # KL(theta_0 || theta_0)
        sum(weights[k] * v for k, v in terms_c.items()).backward()
        opt.step()
        opt.zero_grad()


def test_topk_kl_error_is_reported(world, tmp_path, capsys):
    """After one GA+KL step (theta != theta_0) the cached top-k KL falls short of the exact KL by an error that
    shrinks with k; the run dir's reference.json records theta_0's mass outside the top k."""
    _, method, weights, model, streams, exact = _setup(world, tmp_path, "ga_kl", topk=10 ** 6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = _forward(model, method, _batches(method, streams, world["tok"]), exact)
    sum(weights[k] * v for k, v in method.terms(out).items()).backward()
    opt.step()
    batches = _batches(method, streams, world["tok"], rows=(4, 5, 6, 7))
    with torch.no_grad():
        kl_exact = method.terms(_forward(model, method, batches, exact))["retain"].item()
    vocab = len(world["tok"])
    rows, last = [], None
    for k in (1, 8, 64, vocab):
        cfg = _cfg(world, tmp_path / f"k{k}", "ga_kl", topk=k)
        ref = R.build_reference(cfg, {}, method, world["theta0"], streams, world["tok"])
        with torch.no_grad():
            kl_k = method.terms(_forward(model, method, batches, ref))["retain"].item()
        entry = json.loads((tmp_path / f"k{k}" / "run" / "reference.json").read_text())["reference"]["entries"]
        entry = entry["logits/retain"]
        assert entry["exact"] == (k >= vocab)
        rest = entry.get("topk_stats", {}).get("rest_mass_mean", 0.0)
        rows.append((k, kl_k, (kl_exact - kl_k) / kl_exact, rest))
        assert kl_k <= kl_exact * (1 + 1e-6)
        if last is not None:
            assert kl_k >= last * (1 - 1e-6)
        last = kl_k
    assert rows[-1][2] == pytest.approx(0.0, abs=1e-6) and rows[0][2] > rows[1][2] > rows[2][2]
    assert rows[0][3] > rows[1][3] > rows[2][3] > 0.0
    with capsys.disabled():
        print(f"\ncached KL vs exact ({kl_exact:.4g}) after one GA+KL step, toy model, vocab {vocab}:")
        for k, kl_k, err, rest in rows:
            print(f"  k={k:4d}  KL={kl_k:.4g}  relative error {err:.2%}  theta_0 mass outside top-k {rest:.3g}")


def test_adversarial_labels_exclude_the_true_next_token_and_special_tokens(world, tmp_path):
    cfg, method, _, model, streams, _ = _setup(world, tmp_path, "adversarial_labels")
    tok, forget = world["tok"], streams["forget"]
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    rows = list(range(forget.stats.num_chunks))
    batch = forget.batch(rows, SEQ_LEN, tok.pad_token_id)
    adv = batch["adversarial_labels"]
    with torch.no_grad():
        logits = world["theta0"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    true_next, adv_next = batch["labels"][:, 1:], adv[:, 1:]
    counted = true_next != IGNORE_INDEX
    true_special = counted & torch.isin(true_next, special)
    assert torch.equal(adv_next == IGNORE_INDEX, ~counted)  # padding stays masked
    assert true_special.any() and torch.equal(adv_next[true_special], true_next[true_special])  # EOS keeps its label
    text = counted & ~true_special
    assert not (adv_next[text] == true_next[text]).any()
    assert not torch.isin(adv_next[text], special).any() and adv_next[text].max() < len(tok)
    # theta_0's argmax once the true next token and the special tokens are removed, position by position.
    for b, t in text.nonzero().tolist()[:: 7]:
        row = logits[b, t].clone()
        row[true_next[b, t]] = float("-inf")
        row[special] = float("-inf")
        row[len(tok):] = float("-inf")
        assert adv_next[b, t].item() == row.argmax().item()
    # Stored and reused: a second run with the same model and data builds nothing.
    fresh = _streams(world, cfg, tok, ("forget",))
    report = R.attach_precomputed(cfg, method, model, fresh, tok)
    assert report["adversarial_labels/forget"]["built"] is False
    assert torch.equal(fresh["forget"].batch(rows, SEQ_LEN, tok.pad_token_id)["adversarial_labels"], adv)


def test_adversarial_label_pass_excludes_special_ids_and_padded_vocabulary_rows():
    """The theta_0 pass hands adversarial_targets the special ids and every output row past len(tokenizer)."""
    from types import SimpleNamespace
    special, num_tokens = [0, 1], 6                       # ids 6, 7: a model vocabulary padded past the tokenizer
    compute = R._compute_fn("adversarial_labels", None, None, (special, num_tokens))
    logits = torch.tensor([[[0, 0, 0, 0, 1, 2, 0, 9],     # predicts 3: 7 is padding past the tokenizer -> 5
                            [8, 0, 0, 1, 0, 0, 0, 0],     # predicts 4: 0 is special -> 3
                            [0, 0, 0, 0, 0, 0, 0, 0]]], dtype=torch.float32)
    values = compute(SimpleNamespace(logits=logits), {"labels": torch.tensor([[2, 3, 4]])})
    assert values["labels"].dtype == torch.int32 and values["labels"].tolist() == [[2, 5, 3]]


def test_random_labels_drawn_once_with_the_seed(world, tmp_path):
    tok = world["tok"]
    special = set(tok.all_special_ids)

    def labels(seed):
        cfg = _cfg(world, tmp_path, "random_labels", seed=seed)
        method = build_method(cfg.method)
        streams = _streams(world, cfg, tok, ("forget",))
        report = R.attach_precomputed(cfg, method, None, streams, tok)["random_labels/forget"]
        rows = list(range(streams["forget"].stats.num_chunks))
        return report, streams["forget"].batch(rows, SEQ_LEN, tok.pad_token_id)

    first, batch = labels(7)
    again, batch_again = labels(7)
    other, batch_other = labels(8)
    true, rnd = batch["labels"], batch["random_labels"]
    assert first["built"] and not again["built"] and other["built"] and other["key"] != first["key"]
    assert torch.equal(rnd, batch_again["random_labels"]) and not torch.equal(rnd, batch_other["random_labels"])
    assert torch.equal(rnd == IGNORE_INDEX, true == IGNORE_INDEX)
    is_special = torch.isin(true, torch.tensor(sorted(special)))
    assert is_special.any() and torch.equal(rnd[is_special], true[is_special])  # EOS keeps its label
    drawn = rnd[(true != IGNORE_INDEX) & ~is_special]
    assert not torch.isin(drawn, torch.tensor(sorted(special))).any() and drawn.max() < len(tok)
    assert (drawn != true[(true != IGNORE_INDEX) & ~is_special]).float().mean() > 0.9
    assert drawn.unique().numel() > 0.5 * (len(tok) - len(special))  # spread over the vocabulary


def test_cache_key_follows_model_data_and_settings(world, tmp_path):
    from transformers import AutoModelForCausalLM
    tok = world["tok"]

    def key(cfg, stream="retain", topk=None):
        streams = _streams(world, cfg, tok, (stream,))
        report, _ = R.ensure_entry(cfg, "logits", stream, streams[stream], world["theta0"], tok,
                                   cfg.train.micro_batch_size, topk=topk)
        return report

    base = _cfg(world, tmp_path, "ga_kl")
    first = key(base, topk=8)
    assert first["built"] and not key(base, topk=8)["built"]
    assert key(base, topk=16)["key"] != first["key"]                       # settings
    assert key(base, stream="general", topk=8)["key"] != first["key"]      # data
    moved = AutoModelForCausalLM.from_pretrained(world["model"])
    with torch.no_grad():
        moved.lm_head.weight.mul_(1.01)
    moved.save_pretrained(tmp_path / "moved")
    tok.save_pretrained(tmp_path / "moved")
    other_model = from_dict(RunConfig, {**json.loads(json.dumps(_as_dict(base))), "model": {"path": str(tmp_path / "moved")}})
    assert key(other_model, topk=8)["key"] != first["key"]                 # model


def _as_dict(cfg):
    from dsunlearn.config import to_dict
    return to_dict(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_row_store_roundtrip(tmp_path, dtype):
    """Rows written in any order by rank 0 read back bit for bit, any dtype, scalar rows too."""
    torch.manual_seed(0)
    values = (torch.randn(5, 3, 4) * 100).to(dtype)
    scalars = torch.randn(5).to(dtype)
    writer = R._EntryWriter(tmp_path / "entry", num_rows=5)
    writer.write([4, 0, 2], {"v": values[[4, 0, 2]], "s": scalars[[4, 0, 2]]})
    writer.write([1, 3], {"v": values[[1, 3]], "s": scalars[[1, 3]]})
    writer.finish({"key": "k"})
    assert R._entry_complete(tmp_path / "entry", "k") and not R._entry_complete(tmp_path / "entry", "other")
    meta, stores = R.open_entry(tmp_path / "entry")
    assert meta["num_rows"] == 5 and stores["v"].dtype == dtype
    assert torch.equal(stores["v"].read([3, 1, 1]), values[[3, 1, 1]])
    assert torch.equal(stores["s"].read(range(5)), scalars)
    with pytest.raises(IndexError):
        stores["s"].read([5])
