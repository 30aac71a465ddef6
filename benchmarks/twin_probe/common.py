"""Shared helpers for the issue #13 probe: data, models, evaluation (read-only use of dsunlearn)."""
import os, sys, json, math, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import numpy as np
import torch
torch.set_num_threads(1)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
from transformers import AutoModelForCausalLM, AutoTokenizer
from sklearn.metrics import roc_auc_score
from dsunlearn.data import load_documents, tokenize_and_chunk
from dsunlearn.eval.mia import token_stats, scores_from_tokens

WORLD = os.environ.get("PROBE_WORLD", f"{ROOT}/.cache/demo_world/world")  # another pair: its world
PRE = os.environ.get("PROBE_PAIR", f"{ROOT}/dsunlearn/demo/pretrained")  # ... and its models
OUT = os.environ.get("PROBE_DIR", os.path.join(ROOT, ".cache", "twin_probe"))
CACHE = os.path.join(OUT, "cache")
SEQ = 128


def load_model(which):
    m = AutoModelForCausalLM.from_pretrained(f"{PRE}/{which}" if not which.startswith("/") else which,
                                             torch_dtype=torch.float32)
    m.eval()
    return m


def tokenizer():
    return AutoTokenizer.from_pretrained(f"{PRE}/original")


def chunks(split, tok=None):
    """list of token-id lists (unpadded), cached."""
    os.makedirs(CACHE, exist_ok=True)
    p = f"{CACHE}/{split}.json"
    if os.path.exists(p):
        return json.load(open(p))
    tok = tok or tokenizer()
    ds = load_documents(f"{WORLD}/{split}.jsonl")
    ch, _ = tokenize_and_chunk(ds, tok, SEQ, 16, True, source=split)
    ids = [list(x) for x in ch["input_ids"]]
    json.dump(ids, open(p, "w"))
    return ids


def demo_sample(ids, n=64, seed=0):
    if len(ids) <= n:
        return list(range(len(ids)))
    rng = np.random.default_rng([seed, len(ids)])
    return list(np.sort(rng.choice(len(ids), n, replace=False)))


def pad(batch, pad_id=2):
    L = max(len(x) for x in batch)
    inp = torch.full((len(batch), L), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), L), -100, dtype=torch.long)
    for i, x in enumerate(batch):
        inp[i, :len(x)] = torch.tensor(x)
        lab[i, :len(x)] = torch.tensor(x)
    att = (lab != -100).long()
    return inp, lab, att


@torch.no_grad()
def split_stats(model, ids, texts=None, bs=32):
    """per-chunk mean NLL + all MIA scores + per-token logprobs (list of arrays)."""
    nll, scores, toks = [], {}, []
    for i in range(0, len(ids), bs):
        inp, lab, att = pad(ids[i:i + bs])
        logits = model(input_ids=inp, attention_mask=att).logits
        ts = token_stats(logits, lab)
        sc = scores_from_tokens(ts, texts=texts[i:i + bs] if texts is not None else None)
        for k, v in sc.items():
            scores.setdefault(k, []).append(v)
        for r in range(len(inp)):
            m = ts.mask[r]
            toks.append(ts.logprob[r][m].numpy().copy())
    scores = {k: torch.cat(v).numpy() for k, v in scores.items()}
    return scores, toks


def texts_of(ids, tok):
    return tok.batch_decode(ids, skip_special_tokens=True)


class Evaluator:
    """forget/approx: all chunks; retain: demo 64-sample + 256-sample. Also demo 64-sample numbers for all."""

    def __init__(self, tok=None):
        tok = tok or tokenizer()
        self.tok = tok
        self.f = chunks("forget", tok)
        self.a = chunks("approximate", tok)
        self.r = chunks("retain", tok)
        rng = np.random.default_rng(123)
        self.r_idx = sorted(set(demo_sample(self.r)) | set(rng.choice(len(self.r), 192, replace=False).tolist()))
        self.r_eval = [self.r[i] for i in self.r_idx]
        self.ft = texts_of(self.f, tok)
        self.at = texts_of(self.a, tok)
        self.fs, self.as_ = demo_sample(self.f), demo_sample(self.a)
        self.rs = [self.r_idx.index(i) for i in demo_sample(self.r)]

    def __call__(self, model, full=True):
        model.eval()
        fsc, ftok = split_stats(model, self.f, self.ft)
        asc, atok = split_stats(model, self.a, self.at)
        rsc, _ = split_stats(model, self.r_eval)
        out = {}
        # token-weighted mean loss (as the demo reports? use chunk-mean of token-mean -> report token mean)
        def tokmean(toks, idx=None):
            t = toks if idx is None else [toks[i] for i in idx]
            return float(-np.concatenate(t).mean())
        out["forget"] = tokmean(ftok)
        out["approx"] = tokmean(atok)
        out["retain"] = float(-rsc["mia_loss"].mean())
        out["forget64"] = tokmean(ftok, self.fs)
        out["approx64"] = tokmean(atok, self.as_)
        out["retain64"] = float(-rsc["mia_loss"][self.rs].mean())
        aucs, aucs64 = {}, {}
        for k in fsc:
            y = np.r_[np.ones(len(self.f)), np.zeros(len(self.a))]
            aucs[k] = float(roc_auc_score(y, np.r_[fsc[k], asc[k]]))
            y64 = np.r_[np.ones(64), np.zeros(64)]
            aucs64[k] = float(roc_auc_score(y64, np.r_[fsc[k][self.fs], asc[k][self.as_]]))
        out["auc"] = aucs
        out["auc64"] = aucs64
        best = max(aucs, key=aucs.get)
        out["best_attack"], out["best_auc"] = best, aucs[best]
        b64 = max(aucs64, key=aucs64.get)
        out["best_attack64"], out["best_auc64"] = b64, aucs64[b64]
        out["_ftok"], out["_atok"] = ftok, atok
        return out


def fmt(o, ref=None):
    s = (f"F {o['forget']:.3f} R {o['retain']:.3f} A {o['approx']:.3f} | AUC {o['best_auc']:.3f} ({o['best_attack']})"
         f" loss {o['auc']['mia_loss']:.3f} mk10 {o['auc']['mia_min_k_10']:.3f} mkpp10 {o['auc']['mia_min_k_pp_10']:.3f}"
         f" | 64: F {o['forget64']:.3f} R {o['retain64']:.3f} A {o['approx64']:.3f} AUC {o['best_auc64']:.3f}")
    if ref is not None:
        s += (f" | gap F {100*(o['forget']/ref['forget']-1):+.1f}% R {100*(o['retain']/ref['retain']-1):+.1f}%"
              f" A {100*(o['approx']/ref['approx']-1):+.1f}% dAUC {o['best_auc']-ref['best_auc']:+.3f}")
    return s


def take_cycling(pool, perm, n, rng):
    """``n`` items of ``pool``, drawn through seeded permutations that are refilled when used up (``perm`` keeps the
    state between calls)."""
    out = []
    while len(out) < n:
        if not perm:
            perm.extend(rng.permutation(len(pool)).tolist())
        out.append(pool[perm.pop()])
    return out
