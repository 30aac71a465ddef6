from common import *
import pickle
res=pickle.load(open(os.path.join(OUT, "base.pkl"), "rb"))
o,t=res["original"],res["retrained"]
F=[-x for x in o["_ftok"]]; A=[-x for x in o["_atok"]]; T=[-x for x in t["_ftok"]]
Lf=np.concatenate(F).mean(); La=np.concatenate(A).mean()
co=np.array([x.mean() for x in F]); ct=np.array([x.mean() for x in T]); ca=np.array([x.mean() for x in A])
print("chunk loss: orig forget mean %.3f std %.3f | twin forget %.3f std %.3f | approx %.3f std %.3f"%(co.mean(),co.std(),ct.mean(),ct.std(),ca.mean(),ca.std()))
print("corr(orig chunk loss, twin delta) %.3f"%np.corrcoef(co,ct-co)[0,1])
def aucs(Fm):
    y=np.r_[np.ones(len(Fm)),np.zeros(len(A))]
    out={}
    out["loss"]=roc_auc_score(y,np.r_[[-x.mean() for x in Fm],[-x.mean() for x in A]])
    for k in [10,20,50]:
        mk=lambda x: -np.sort(x)[::-1][:max(1,len(x)*k//100)].mean()
        out[f"mk{k}"]=roc_auc_score(y,np.r_[[mk(x) for x in Fm],[mk(x) for x in A]])
    return {k:round(v,3) for k,v in out.items()}, round(np.concatenate(Fm).mean(),3)
kap=La/Lf; D=La-Lf
print("kappa %.3f delta %.3f"%(kap,D))
print("orig", aucs(F)); print("twin", aucs(T))
print("+delta", aucs([x+D for x in F]))
print("*kappa", aucs([x*kap for x in F]))
for b in [1.1,1.2,1.3]:
    a=La-b*Lf; print("affine b=%.1f"%b, aucs([a+b*x for x in F]))
