from common import *
import pickle, sys
ev=Evaluator()
base=pickle.load(open(os.path.join(OUT, "base.pkl"), "rb")); o,t=base["original"],base["retrained"]
V=8192
cf=np.bincount(np.concatenate([x[1:] for x in ev.f]),minlength=V).astype(float)
cr=np.bincount(np.concatenate([x[1:] for x in ev.r]),minlength=V).astype(float)
rf=cf/cf.sum(); rr=cr/cr.sum()
tg=np.concatenate([x[1:] for x in ev.f])
fo=-np.concatenate(o["_ftok"]); ft=-np.concatenate(t["_ftok"])
ratio=rf[tg]/np.maximum(rr[tg],1e-12)
print("forget tokens by freq ratio (forget rate / retain rate): frac tokens, orig, twin, delta, share of total delta")
tot=(ft-fo).sum()
for lo,hi in [(0,1),(1,3),(3,10),(10,30),(30,1e9)]:
    m=(ratio>=lo)&(ratio<hi)
    print(f"[{lo},{hi}) {m.mean():.3f} {fo[m].mean():.3f} {ft[m].mean():.3f} {(ft-fo)[m].mean():+.3f} {(ft-fo)[m].sum()/tot:.3f}")
print("retain count==0 tokens:", ((cr[tg]==0)).mean())
