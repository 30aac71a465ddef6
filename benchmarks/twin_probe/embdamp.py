"""Token-frequency embedding dampening: rows of the tied embedding for token ids whose rate in the forget set exceeds
alpha x their rate in the retain set are scaled by beta = min(1, lam * rate_r / rate_f). No forward pass needed."""
from common import *
import pickle, sys
ev=Evaluator(); base=pickle.load(open(os.path.join(OUT, "base.pkl"), "rb")); tw=base["retrained"]
V=8192
cf=np.bincount(np.concatenate([x[1:] for x in ev.f]),minlength=V).astype(float)
cr=np.bincount(np.concatenate([x[1:] for x in ev.r]),minlength=V).astype(float)
rf=cf/cf.sum(); rr=(cr+0.5)/cr.sum()
model=load_model("original"); E0=model.model.embed_tokens.weight.detach().clone()
for a in sys.argv[1:]:
    alpha,lam=map(float,a.split(","))
    ratio=rf/rr
    sel=ratio>alpha
    beta=np.where(sel, np.minimum(1, lam/np.maximum(ratio,1e-12)), 1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(E0*torch.tensor(beta,dtype=torch.float32)[:,None])
    o=ev(model)
    print(f"EMB alpha {alpha} lam {lam} rows {sel.sum()}: "+fmt(o,tw),flush=True)
    if os.environ.get("SAVE"): model.save_pretrained(os.path.join(OUT, f"emb_a{alpha:g}_l{lam:g}"))
