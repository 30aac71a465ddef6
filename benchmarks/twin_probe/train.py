"""Unlearning recipes for issue #13. Usage: python train.py --name X [--forget kl_target|sq_target|ga|none] ...

Forget term "kl_target" (proposed): per forget token t with frozen-θ0 NLL l0_t, the teacher is θ0's next-token
distribution with the target token's probability set to exp(-kappa*l0_t) and the other tokens rescaled to fill the
rest; loss = KL(teacher || p_θ). kappa = L_unseen(θ0) / L_forget(θ0) (two scalars, the tool's stop target over the
original's forget loss). Retain term: KL(p_θ0 || p_θ) on retain chunks ("kl") or NLL ("nll").
"""
import argparse, pickle
from common import *
import torch.nn.functional as Fn

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--forget", default="kl_target")
p.add_argument("--retain", default="kl")          # kl | nll | none
p.add_argument("--kappa", type=float, default=None)  # default: L_approx(θ0)/L_forget(θ0) on the 64-chunk samples
p.add_argument("--shift", type=float, default=None)  # additive target instead (l0 + shift)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--bf", type=int, default=8)
p.add_argument("--br", type=int, default=8)
p.add_argument("--wr", type=float, default=1.0)
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--eval_every", type=int, default=0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--stop", action="store_true", help="stop when forget64 loss >= original approx64 loss - 0.1 (tool rule)")
p.add_argument("--save", default=None)
p.add_argument("--init", default="original")
p.add_argument("--mask_alpha", type=float, default=None)
p.add_argument("--fisher", default=os.path.join(CACHE, "fisher.pt"))
args = p.parse_args()
torch.manual_seed(args.seed)

tok = tokenizer()
ev = Evaluator(tok)
model = load_model(args.init)
ref = load_model("original")
for q in ref.parameters():
    q.requires_grad_(False)
base = pickle.load(open(os.path.join(OUT, "base.pkl"), "rb"))
o0, tw = base["original"], base["retrained"]
kappa = args.kappa if args.kappa is not None else o0["approx64"] / o0["forget64"]
print(f"kappa {kappa:.4f}  shift {args.shift}", flush=True)

rng = np.random.default_rng(args.seed)
F, R = ev.f, ev.r
fperm, rperm = [], []


def take(pool, perm, n):
    return take_cycling(pool, perm, n, rng)


mask = None
if args.mask_alpha is not None:
    If, Ir = torch.load(args.fisher)
    mask = {n: (If[n] > args.mask_alpha * Ir[n]).float() for n, _ in model.named_parameters()}
    print("mask frac %.4f" % (sum(m.sum().item() for m in mask.values()) / sum(m.numel() for m in mask.values())))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
cost = 0  # forward units: fwd+bwd = 3, fwd = 1, per chunk


def shifted(logits, lab):
    return logits[:, :-1].float(), lab[:, 1:]


def forget_loss(batch):
    global cost
    inp, lab, att = pad(batch)
    logits, y = shifted(model(input_ids=inp, attention_mask=att).logits, lab)
    m = y != -100
    yy = y.clamp_min(0)
    logp = torch.log_softmax(logits, -1)
    lt = -logp.gather(-1, yy[..., None])[..., 0]           # θ NLL per token
    cost += 3 * len(batch)
    if args.forget == "ga":
        return -(lt[m]).mean(), lt[m].mean().item()
    with torch.no_grad():
        cost += len(batch)
        logp0 = torch.log_softmax(ref(input_ids=inp, attention_mask=att).logits[:, :-1].float(), -1)
        l0 = -logp0.gather(-1, yy[..., None])[..., 0]
        tgt = l0 + args.shift if args.shift is not None else kappa * l0
        tgt = torch.maximum(tgt, l0)
    if args.forget == "sq_target":
        return ((lt - tgt)[m] ** 2).mean(), lt[m].mean().item()
    if args.forget == "hinge_target":
        return (torch.relu(tgt - lt)[m] ** 2).mean(), lt[m].mean().item()
    if args.forget == "kl_target":
        with torch.no_grad():
            p0 = logp0.exp()
            pt0 = p0.gather(-1, yy[..., None])                # θ0 target prob
            pt = torch.exp(-tgt)[..., None]                  # new target prob
            scale = (1 - pt) / (1 - pt0).clamp_min(1e-6)      # rescale non-targets
            q = p0 * scale
            q.scatter_(-1, yy[..., None], pt)
            logq = torch.log(q.clamp_min(1e-30))
        kl = (q * (logq - logp)).sum(-1)
        return kl[m].mean(), lt[m].mean().item()
    raise ValueError(args.forget)


def retain_loss(batch):
    global cost
    inp, lab, att = pad(batch)
    logits, y = shifted(model(input_ids=inp, attention_mask=att).logits, lab)
    m = y != -100
    cost += 3 * len(batch)
    logp = torch.log_softmax(logits, -1)
    if args.retain == "nll":
        return -logp.gather(-1, y.clamp_min(0)[..., None])[..., 0][m].mean()
    with torch.no_grad():
        cost += len(batch)
        logp0 = torch.log_softmax(ref(input_ids=inp, attention_mask=att).logits[:, :-1].float(), -1)
    kl = (logp0.exp() * (logp0 - logp)).sum(-1)
    return kl[m].mean()


t0 = time.time()
log = []
for step in range(1, args.steps + 1):
    model.train()
    opt.zero_grad()
    lf, fl = forget_loss(take(F, fperm, args.bf)) if args.forget != "none" else (torch.zeros(()), float("nan"))
    lr_ = retain_loss(take(R, rperm, args.br)) if args.retain != "none" else torch.zeros(())
    (lf + args.wr * lr_).backward()
    if mask is not None:
        for n, q in model.named_parameters():
            if q.grad is not None:
                q.grad.mul_(mask[n])
    if args.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    if step % 5 == 0 or step == 1:
        print(f"step {step} Lf {lf.item():.4f} fnll {fl:.3f} Lr {lr_.item():.4f} cost {cost} ({time.time()-t0:.0f}s)", flush=True)
    done = step == args.steps
    if args.eval_every and step % args.eval_every == 0 and not done:
        o = ev(model)
        print(f"  eval@{step}: " + fmt(o, tw), flush=True)
        log.append((step, cost, {k: v for k, v in o.items() if not k.startswith("_")}))
        if args.stop and o["forget64"] >= o0["approx64"] - 0.1:
            done = True
    if done:
        break
o = ev(model)
budget = 700 * 16 * 3
print(f"FINAL {args.name} steps {step} cost {cost} units = {cost/budget*100:.1f}% of pretraining")
print("FINAL " + fmt(o, tw))
print("AUCS", {k: round(v, 3) for k, v in o["auc"].items()})
log.append((step, cost, {k: v for k, v in o.items() if not k.startswith("_")}))
os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
json.dump({"args": vars(args), "kappa": kappa, "log": log}, open(os.path.join(OUT, "runs", f"{args.name}.json"), "w"))
if args.save:
    model.save_pretrained(args.save)
