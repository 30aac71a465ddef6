"""Selective-synaptic-dampening probe: diag Fisher on forget vs retain, dampen forget-specific weights."""
import pickle, sys
from common import *

tok = tokenizer()
ev = Evaluator(tok)
base = pickle.load(open(os.path.join(OUT, "base.pkl"), "rb"))
tw = base["retrained"]
model = load_model("original")
theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
P = os.environ.get("FISHER", os.path.join(CACHE, "fisher.pt"))
NR = int(os.environ.get("NR", 384))


def fisher(ids):
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in ids:
        inp, lab, att = pad([x])
        model.zero_grad()
        out = model(input_ids=inp, attention_mask=att, labels=lab)
        out.loss.backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.detach() ** 2
    return {n: v / len(ids) for n, v in acc.items()}


if os.path.exists(P):
    If, Ir = torch.load(P)
else:
    t = time.time()
    If = fisher(ev.f)
    rng = np.random.default_rng(7)
    Ir = fisher([ev.r[i] for i in rng.choice(len(ev.r), NR, replace=False)])
    torch.save((If, Ir), P)
    print(f"fisher {time.time()-t:.0f}s cost units {3*(len(ev.f)+NR)}", flush=True)

grid = [tuple(map(float, a.split(","))) for a in sys.argv[1:]] or [(10, 1), (5, 1), (2, 1), (1, 1)]
for alpha, lam in grid:
    nd, tot = 0, 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            sel = If[n] > alpha * Ir[n]
            if os.environ.get("EXCL") and os.environ["EXCL"] in n:
                sel = torch.zeros_like(sel)
            if os.environ.get("ONLY") and os.environ["ONLY"] not in n:
                sel = torch.zeros_like(sel)
            beta = torch.clamp(lam * Ir[n] / If[n].clamp_min(1e-30), max=1.0)
            p.copy_(torch.where(sel, theta0[n] * beta, theta0[n]))
            nd += int(sel.sum()); tot += sel.numel()
    o = ev(model)
    if os.environ.get("SAVE"):
        model.save_pretrained(f"{os.environ['SAVE']}_a{alpha:g}_l{lam:g}")
    print(f"SSD alpha {alpha} lam {lam} dampened {nd}/{tot} ({100*nd/tot:.2f}%): " + fmt(o, tw), flush=True)
