"""Probe round 2 (issue #13; docs/tuning.md "Toward the twin"), recipes: perturb the original (shrink/noise/partial re-init) then descend on RETAIN (optionally a hinged
forget ascent that stops at a scalar target). No use of the twin (evaluation only) nor of approximate per-token stats.

Round 3 (issue #23, docs/tuning.md "What limits the repair"): the repair's variants, all after the round-2 recipe's
rows edit and negation: ``--fmode hold`` (each forget chunk's loss held at or above its loss after the negation),
``--project global|tensor`` (the repair kept off the negation's direction, what ``negate_repair`` now ships),
``--repair kl|kl+nll`` (KL to the original on retain), ``--tv_contrast`` (the task vector minus a retain fine-tune's),
``--tv_skip_rows`` (the negation leaves the edited rows alone).
Before 2026-12-07 ``--fmode hinge`` had the wrong sign: it *descended* on forget chunks below the target (loss -
relu(target - l)); it is now loss + relu(target - l), an ascent that stops at the target.

Cost units: chunk forward+backward = 3, forward = 1. Budget 3,360 (1/10 of pretraining).
"""
import argparse, pickle, collections
from common import *

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--shrink", type=float, default=1.0)       # θ <- shrink*θ (2-D tensors)
p.add_argument("--noise", type=float, default=0.0)        # + noise*N(0, 0.02) (2-D tensors)
p.add_argument("--emb_alpha", type=float, default=None)   # forget-specific token rows: rate_f >= alpha * rate_r
p.add_argument("--emb_mode", default="reinit")            # reinit | zero | mean | scale
p.add_argument("--emb_scale", type=float, default=0.3)
p.add_argument("--reinit_layers", default="")             # e.g. "3" or "2,3" or "mlp3"
p.add_argument("--steps", type=int, default=70)
p.add_argument("--br", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--min_lr_ratio", type=float, default=0.1)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--sched", default="cosine")               # cosine | const
p.add_argument("--wd", type=float, default=0.0)
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--bf", type=int, default=0)               # forget chunks per step for the hinged ascent
p.add_argument("--wf", type=float, default=1.0)
p.add_argument("--fstop", type=float, default=None)       # chunk-loss target (default original's approx mean)
p.add_argument("--fmode", default="hinge")                # hinge: +relu(target - l_chunk); hold: + relu(floor_c - l_c)
p.add_argument("--repair", default="nll")
p.add_argument("--kl_w", type=float, default=1.0)
p.add_argument("--tv_skip_rows", type=int, default=0)
p.add_argument("--project", default="")
p.add_argument("--floor_shift", type=float, default=0.0)  # hold: the floors (each chunk's loss after the negation) moved by this
p.add_argument("--eval_at", default="")                   # e.g. "20,40"
p.add_argument("--seed", type=int, default=0)
p.add_argument("--init", default="original")
p.add_argument("--save", default=None)
p.add_argument("--tv_steps", type=int, default=0)         # task-vector negation: fine-tune a copy on forget
p.add_argument("--tv_lr", type=float, default=1e-3)
p.add_argument("--tv_bs", type=int, default=16)
p.add_argument("--tv_beta", type=float, default=1.0)      # θ <- θ0 - beta*(θ_f - θ0)
p.add_argument("--tv_contrast", type=float, default=0.0)  # τ = θ_f - θ0 - c*(θ_r - θ0), θ_r: same steps on retain
p.add_argument("--tv_topk", type=float, default=1.0)      # keep only this fraction of |τ| entries (per tensor)
args = p.parse_args()
torch.manual_seed(args.seed)
tok = tokenizer()
ev = Evaluator(tok)
base = pickle.load(open(os.path.join(OUT, "base.pkl"), "rb"))
o0, tw = base["original"], base["retrained"]
model = load_model(args.init)
BUDGET = 3360
cost = 0

# ---- perturbation (no data cost except token counting) ----
with torch.no_grad():
    if args.shrink != 1.0 or args.noise:
        for n, q in model.named_parameters():
            if q.dim() == 2:
                q.mul_(args.shrink).add_(args.noise * 0.02 * torch.randn_like(q))
    if args.emb_alpha is not None:
        V = model.config.vocab_size
        cf = np.bincount(np.concatenate([np.array(x) for x in ev.f]), minlength=V).astype(float)
        cr = np.bincount(np.concatenate([np.array(x) for x in ev.r]), minlength=V).astype(float)
        rate = (cf / cf.sum()) / ((cr + 1) / cr.sum())
        sel = torch.tensor((rate >= args.emb_alpha) & (cf > 0))
        E = model.get_input_embeddings().weight
        if args.emb_mode == "reinit":
            E[sel] = 0.02 * torch.randn(int(sel.sum()), E.shape[1])
        elif args.emb_mode == "zero":
            E[sel] = 0
        elif args.emb_mode == "mean":
            E[sel] = E[~sel].mean(0)
        elif args.emb_mode == "scale":
            E[sel] *= args.emb_scale
        print(f"emb rows touched {int(sel.sum())}", flush=True)
    for spec in [s for s in args.reinit_layers.split(",") if s]:
        part = "mlp" if spec.startswith("mlp") else ("attn" if spec.startswith("attn") else "")
        li = int(spec.lstrip("mlpatn"))
        for n, q in model.model.layers[li].named_parameters():
            if part and not n.startswith("mlp" if part == "mlp" else "self_attn"):
                continue
            if q.dim() == 2:
                q.copy_(0.02 * torch.randn_like(q))
        print(f"reinit layer {spec}", flush=True)

fstop = args.fstop if args.fstop is not None else o0["approx64"]  # scalar: original's mean loss on the approx sample
rng = np.random.default_rng(args.seed)
rperm, fperm = [], []


def take(pool, perm, n):
    return take_cycling(pool, perm, n, rng)


def chunk_nll(batch):
    inp, lab, att = pad(batch)
    logits = model(input_ids=inp, attention_mask=att).logits[:, :-1].float()
    y = lab[:, 1:]
    m = (y != -100).float()
    lt = Fn.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none")
    return (lt * m).sum(1) / m.sum(1)


import torch.nn.functional as Fn
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.95))


def lr_at(s):
    if s < args.warmup:
        return args.lr * (s + 1) / args.warmup
    if args.sched == "const":
        return args.lr
    t = (s - args.warmup) / max(1, args.steps - args.warmup)
    mn = args.lr * args.min_lr_ratio
    return mn + 0.5 * (args.lr - mn) * (1 + math.cos(math.pi * t))


TAU = {}
if args.tv_steps:
    theta0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    topt = torch.optim.AdamW(model.parameters(), lr=args.tv_lr, weight_decay=0.0, betas=(0.9, 0.95))
    for s_ in range(args.tv_steps):
        model.train(); topt.zero_grad()
        l = chunk_nll(take(ev.f, fperm, args.tv_bs)).mean(); cost += 3 * args.tv_bs
        l.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); topt.step()
    print(f"tv: forget nll after {args.tv_steps} steps {l.item():.3f}", flush=True)
    theta_f = {n: q.detach().clone() for n, q in model.named_parameters()}
    theta_r = None
    if args.tv_contrast:
        with torch.no_grad():
            for n, q in model.named_parameters():
                q.copy_(theta0[n])
        topt = torch.optim.AdamW(model.parameters(), lr=args.tv_lr, weight_decay=0.0, betas=(0.9, 0.95))
        for s_ in range(args.tv_steps):
            model.train(); topt.zero_grad()
            l = chunk_nll(take(ev.r, rperm, args.tv_bs)).mean(); cost += 3 * args.tv_bs
            l.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); topt.step()
        theta_r = {n: q.detach().clone() for n, q in model.named_parameters()}
    with torch.no_grad():
        for n, q in model.named_parameters():
            tau = theta_f[n] - theta0[n]
            if theta_r is not None:
                tau = tau - args.tv_contrast * (theta_r[n] - theta0[n])
            if args.tv_skip_rows and n == "model.embed_tokens.weight":
                tau = tau.clone(); tau[sel] = 0
            if args.tv_topk < 1.0:
                k = max(1, int(args.tv_topk * tau.numel()))
                thr = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
                tau = torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))
            q.copy_(theta0[n] - args.tv_beta * tau)
            TAU[n] = tau.clone()
    del topt
    fperm.clear()

floors = None
if args.bf and args.fmode == "hold":
    model.eval()
    with torch.no_grad():
        floors = torch.cat([chunk_nll(ev.f[i:i+32]) for i in range(0, len(ev.f), 32)]) + args.floor_shift
    print("floors mean", floors.mean().item(), flush=True)
fidx = list(range(len(ev.f)))
TEACHER = load_model("original") if args.repair != "nll" else None
eval_at = {int(x) for x in args.eval_at.split(",") if x}
t0 = time.time()
log = []
if 0 in eval_at:
    o = ev(model); print("  eval@0: " + fmt(o, tw), flush=True)
for step in range(args.steps):
    model.train()
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.zero_grad()
    rb = take(ev.r, rperm, args.br)
    if args.repair == "nll":
        lr_ = chunk_nll(rb).mean()
    else:
        inp, lab, att = pad(rb)
        logits = model(input_ids=inp, attention_mask=att).logits[:, :-1].float()
        with torch.no_grad():
            tl = TEACHER(input_ids=inp, attention_mask=att).logits[:, :-1].float()
        m = (lab[:, 1:] != -100).float()
        lp = torch.log_softmax(logits, -1); tp = torch.log_softmax(tl, -1)
        kl = (tp.exp() * (tp - lp)).sum(-1)
        lt = Fn.cross_entropy(logits.transpose(1, 2), lab[:, 1:].clamp_min(0), reduction="none")
        per = (kl * m).sum(1) / m.sum(1)
        nll_ = (lt * m).sum(1) / m.sum(1)
        lr_ = (args.kl_w * per + (nll_ if args.repair == "kl+nll" else 0)).mean()
    cost += 3 * args.br
    loss = lr_
    fl = float("nan")
    if args.bf:
        ii = take(fidx, fperm, args.bf)
        lf = chunk_nll([ev.f[i] for i in ii])
        cost += 3 * args.bf
        fl = lf.mean().item()
        if args.fmode == "hinge":
            loss = loss + args.wf * torch.relu(fstop - lf).mean()
        elif args.fmode == "hold":
            loss = loss + args.wf * torch.relu(floors[ii] - lf).mean()
    loss.backward()
    if args.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    if args.project:
        with torch.no_grad():
            if step == 0:
                THN = {n: q.detach().clone() for n, q in model.named_parameters()}
            names = [n for n, _ in model.named_parameters()]
            P = dict(model.named_parameters())
            if args.project == "global":
                dot = sum(float(((P[n] - THN[n]) * TAU[n]).sum()) for n in names)
                nn_ = sum(float((TAU[n] ** 2).sum()) for n in names)
                c = dot / nn_
                if c < 0:  # only the component that undoes the negation (moves back toward +tau... )
                    pass
                for n in names: P[n].sub_(c * TAU[n])
            else:
                for n in names:
                    t = TAU[n]; d = P[n] - THN[n]
                    c = float((d * t).sum()) / max(float((t * t).sum()), 1e-30)
                    P[n].sub_(c * t)
    if (step + 1) % 10 == 0:
        print(f"step {step+1} lr {lr_at(step):.2e} Lr {lr_.item():.3f} Lf {fl:.3f} cost {cost} ({time.time()-t0:.0f}s)",
              flush=True)
    if (step + 1) in eval_at and step + 1 != args.steps:
        o = ev(model)
        print(f"  eval@{step+1} cost {cost}: " + fmt(o, tw), flush=True)
        log.append((step + 1, cost, {k: v for k, v in o.items() if not k.startswith("_")}))
o = ev(model)
print(f"FINAL {args.name} steps {args.steps} cost {cost} ({100*cost/BUDGET:.0f}% of budget)")
print("FINAL " + fmt(o, tw))
print("AUCS", {k: round(v, 3) for k, v in o["auc"].items()})
log.append((args.steps, cost, {k: v for k, v in o.items() if not k.startswith("_")}))
os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
json.dump({"args": vars(args), "log": log}, open(os.path.join(OUT, "runs", f"{args.name}.json"), "w"))
if args.save:
    model.save_pretrained(args.save)
