from common import *
import pickle
res=pickle.load(open(os.path.join(OUT, "base.pkl"), "rb"))
o,t=res["original"],res["retrained"]
fo=np.concatenate(o["_ftok"]); ft=np.concatenate(t["_ftok"])
ao=np.concatenate(o["_atok"]); at=np.concatenate(t["_atok"])
fo,ft,ao,at=-fo,-ft,-ao,-at
print("n tokens", len(fo), len(ao))
qs=[0.05,.1,.25,.5,.75,.9,.95]
for name,x in [("forget orig",fo),("forget twin",ft),("approx orig",ao),("approx twin",at)]:
    print(f"{name:12s} mean {x.mean():.3f} quantiles", np.round(np.quantile(x,qs),3), "frac<0.1 %.3f frac<1 %.3f frac>8 %.3f"%((x<0.1).mean(),(x<1).mean(),(x>8).mean()))
d=ft-fo
print("forget twin-orig: mean %.3f corr %.3f"%(d.mean(), np.corrcoef(fo,ft)[0,1]))
print("approx twin-orig: mean %.3f corr %.3f"%((at-ao).mean(), np.corrcoef(ao,at)[0,1]))
# bin by orig nll
bins=[0,0.05,0.2,0.5,1,2,3,4,6,8,20]
print("bin by ORIGINAL nll on forget: bin, frac tokens, mean orig, mean twin, mean delta, frac of total delta")
tot=d.sum()
for lo,hi in zip(bins[:-1],bins[1:]):
    m=(fo>=lo)&(fo<hi)
    print(f"[{lo},{hi}) {m.mean():.3f} {fo[m].mean():.3f} {ft[m].mean():.3f} {d[m].mean():+.3f} {d[m].sum()/tot:.3f}")
print("same for approx (orig vs twin):")
da=at-ao
for lo,hi in zip(bins[:-1],bins[1:]):
    m=(ao>=lo)&(ao<hi)
    print(f"[{lo},{hi}) {m.mean():.3f} {ao[m].mean():.3f} {at[m].mean():.3f} {da[m].mean():+.3f}")
# bin by twin nll on forget
print("bin by TWIN nll on forget: frac, mean orig, mean twin")
for lo,hi in zip(bins[:-1],bins[1:]):
    m=(ft>=lo)&(ft<hi)
    print(f"[{lo},{hi}) {m.mean():.3f} {fo[m].mean():.3f} {ft[m].mean():.3f}")
# Per chunk: twin loss vs orig loss on forget
co=np.array([-x.mean() for x in o["_ftok"]]); ct=np.array([-x.mean() for x in t["_ftok"]])
print("per-chunk forget: corr %.3f; delta quantiles"%np.corrcoef(co,ct)[0,1], np.round(np.quantile(ct-co,qs),3))
# positions: delta by position
pos=np.concatenate([np.arange(len(x)) for x in o["_ftok"]])
for lo,hi in [(0,8),(8,32),(32,64),(64,128)]:
    m=(pos>=lo)&(pos<hi); print("pos",lo,hi,"orig %.3f twin %.3f"%(fo[m].mean(),ft[m].mean()), "approx orig %.3f"%ao[np.concatenate([np.arange(len(x)) for x in o["_atok"]])>=0].mean() if lo==0 else "")
# min-k: lowest 10% logprob tokens per chunk, orig vs twin
def mink(toks,k=0.2):
    return np.array([np.sort(x)[:max(1,int(len(x)*k))].mean() for x in toks])
for k in [0.1,0.2,0.5]:
    print("mink",k,"forget orig %.3f twin %.3f | approx orig %.3f twin %.3f"%(mink(o["_ftok"],k).mean(),mink(t["_ftok"],k).mean(),mink(o["_atok"],k).mean(),mink(t["_atok"],k).mean()))
# "max-k": highest-prob tokens -- fraction of tokens nearly certain
