from common import *
import pickle
t0=time.time()
ev=Evaluator()
print(len(ev.f),len(ev.a),len(ev.r),len(ev.r_eval), time.time()-t0)
res={}
for w in ["original","retrained"]:
    m=load_model(w); t=time.time(); o=ev(m); print(w, fmt(o), f"{time.time()-t:.1f}s")
    print({k:round(v,3) for k,v in o['auc'].items()})
    res[w]=o
pickle.dump(res,open(os.path.join(OUT, "base.pkl"), "wb"))
