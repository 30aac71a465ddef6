"""Removal requests one after another: each request is an unlearning run that starts from the previous one's model.

    dsunlearn unlearn --config request1.json                              # model.path = the original
    dsunlearn unlearn --config request2.json --after runs/request1        # starts from runs/request1/model

Every run directory records its chain in ``chain.json`` (machine-readable audit trail): the original model (path and
content hash), then one entry per request: its run directory, its forget set (path and sha256), the model it started
from and the model it produced (content hashes, as ``reference.model_fingerprint`` computes them: every file of the
directory). ``--after`` refuses, with exit code 2 and nothing written:
- a directory that is not a finished dsunlearn run (no ``model/`` or ``summary.json``);
- a previous model whose files no longer match the hash its run recorded (changed since);
- a run config whose ``model.path`` is not the chain's original (a request belongs to the model it was made for;
  leave ``model.path`` out or point it at the original).

What each request measures: its own forget set (``forget``) and every earlier request's forget set (``forget@1``,
``forget@2``, ...: loss, accuracy and every membership attack, members = that set, non-members = the approximate set),
before and after, so the report answers "did removing request 3 bring back request 1?".

theta_0 of KL/NPO/RMU-style terms: by default the model this request starts from (the previous request's result);
``reference.path`` set to the original anchors every request to the original model instead (``reference.mode`` =
"engine"). The first keeps each request's retain behaviour close to where the chain already is; the second pulls it
back to the original at every request (and NPO then compares with a model that still knows every earlier request).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from . import engine as E
from .config import ConfigError, RunConfig
from .data import sha256_file, write_json_atomic
from .prepare import with_model

CHAIN_FILE = "chain.json"
SCHEMA_VERSION = 1


def model_hash(cfg: RunConfig, path: str) -> str:
    """Content hash of a model directory (every file; memoised by size and mtime in the reference cache dir)."""
    from .reference import default_cache_dir, model_fingerprint
    return model_fingerprint(with_model(cfg, path), default_cache_dir(cfg))


def data_digest(path: str) -> Optional[str]:
    """sha256 of a data file, or of a folder's files (names and contents); None when it does not exist (``prepare``
    then refuses it with the data loader's message)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode() + b"\0")
    return h.hexdigest()


def request_entry(cfg: RunConfig, index: int, start_hash: str, after: Optional[str]) -> dict:
    return {"index": index, "run_dir": str(Path(cfg.output.run_dir).resolve()), "after": after,
            "method": cfg.method.name, "forget": str(Path(cfg.data.forget).resolve()) if cfg.data.forget else None,
            "forget_sha256": data_digest(cfg.data.forget) if cfg.data.forget else None,
            "start_model": {"path": str(Path(cfg.model.path).resolve()), "sha256": start_hash},
            "theta0": cfg.reference.path or "start model", "result_model": None}


def recorded_chain(run_dir: Path) -> Optional[dict]:
    """The chain a run directory recorded (None for a run made before chains were recorded)."""
    path = run_dir / CHAIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_chain(run_dir: Path) -> dict:
    """The chain of the run ``--after`` names."""
    chain = recorded_chain(run_dir)
    if chain is not None:
        return chain
    raise ConfigError(f"--after {run_dir}: {CHAIN_FILE} missing (not a dsunlearn unlearning run, or made by a version "
                      f"that did not record chains)")


def _plan(cfg: RunConfig, after: Optional[str]) -> tuple[RunConfig, dict]:
    if cfg.model.path:
        E.check_model_dir(cfg)  # its own message before any hashing
    if after is None:
        start = model_hash(cfg, cfg.model.path)
        chain = {"schema_version": SCHEMA_VERSION,
                 "original": {"path": str(Path(cfg.model.path).resolve()), "sha256": start}, "requests": []}
        return cfg, {**chain, "requests": [request_entry(cfg, 1, start, None)]}
    prev = Path(after)
    for needed in ("config.json", "summary.json", "model"):
        if not (prev / needed).exists():
            raise ConfigError(f"--after {after}: {needed} missing: not a finished dsunlearn unlearning run")
    chain = read_chain(prev)
    last = chain["requests"][-1]
    start = model_hash(cfg, str(prev / "model"))
    if last.get("result_model") and last["result_model"]["sha256"] != start:
        raise ConfigError(f"--after {after}: model/ changed since that run exported it (content hash differs from "
                          f"{CHAIN_FILE}); the chain's audit trail would be wrong")
    original = chain["original"]
    if cfg.model.path and Path(cfg.model.path).resolve() != Path(original["path"]) \
            and model_hash(cfg, cfg.model.path) != original["sha256"]:
        raise ConfigError(f"model.path: {cfg.model.path} is not the original model of the chain you continue "
                          f"({original['path']}); a removal request belongs to the model it was made for (leave "
                          f"model.path out, or set it to the original)")
    cfg = with_model(cfg, str(prev / "model"))
    request = request_entry(cfg, len(chain["requests"]) + 1, start, str(prev.resolve()))
    return cfg, {**chain, "requests": chain["requests"] + [request]}


def plan_request(cfg: RunConfig, after: Optional[str]) -> tuple[RunConfig, dict]:
    """(the run config of this request, its chain): rank 0 hashes and checks, every rank gets the result or the
    error (a refusal exits everywhere with code 2). ``after``: the previous request's run directory, or None for the
    first request."""
    result = None
    if E.is_main():
        try:
            result = ("ok", _plan(cfg, after))
        except ConfigError as e:
            result = ("error", str(e))
    status, value = E.broadcast_object(result)
    if status == "error":
        raise ConfigError(value)
    return value


def earlier_forget_sets(chain: dict) -> dict[str, str]:
    """``{"forget@1": path, ...}``: every earlier request's forget set, evaluated at each new request."""
    return {f"forget@{r['index']}": r["forget"] for r in chain["requests"][:-1] if r.get("forget")}


def write_chain(run_dir: str, chain: dict) -> None:
    if E.is_main():
        write_json_atomic(Path(run_dir) / CHAIN_FILE, chain)


def record_result(cfg: RunConfig, run_dir: str) -> Optional[dict]:
    """After the export: the produced model's content hash into this request's entry (rank 0)."""
    path = Path(run_dir) / CHAIN_FILE
    if not E.is_main() or not path.is_file() or not (Path(run_dir) / "model").is_dir():
        return None
    chain = json.loads(path.read_text())
    model = Path(run_dir) / "model"
    chain["requests"][-1]["result_model"] = {"path": str(model.resolve()), "sha256": model_hash(cfg, str(model))}
    write_json_atomic(path, chain)
    return chain
