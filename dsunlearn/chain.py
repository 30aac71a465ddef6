"""Removal requests one after another: each request is an unlearning run that starts from the previous one's model.

    dsunlearn unlearn --config request1.json                              # model.path = the original
    dsunlearn unlearn --config request2.json --after runs/request1        # starts from runs/request1/model

Every run directory records its chain in ``chain.json`` (machine-readable audit trail): the original model (path and
content hash), then one entry per request: its run directory, its forget set (path and sha256), the model it started
from and the model it produced (content hashes, as ``reference.model_fingerprint`` computes them: every file of the
directory). ``--after`` refuses, with exit code 2 and nothing written:
- a directory that is not a finished dsunlearn run (no ``model/`` or ``summary.json``), one without a ``chain.json``
  (``read_chain`` says why), a ``chain.json`` that cannot be read, or one that records no result model (the run never
  finished its export);
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
    """The chain a run directory recorded (None for a run made before chains were recorded). A file that cannot be
    read, or that lacks what every chain has, is the user's one-line error naming it."""
    path = run_dir / CHAIN_FILE
    if not path.is_file():
        return None
    try:
        chain = json.loads(path.read_text())
        original, requests = chain["original"], chain["requests"]
        if not (original["path"] and original["sha256"] and requests and all("index" in r for r in requests)):
            raise ValueError("empty original or request list")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable chain record ({type(e).__name__}: {e}); it is written by "
                          f"dsunlearn unlearn and must not be edited") from None
    return chain


def original_of(model_dir: str, default: str) -> str:
    """One rule for "the original model" of a model directory (the run's audits and ``dsunlearn audit``): the
    chain's original when the directory is a run's exported ``model/`` with a ``chain.json`` beside it, else
    ``default`` (``model.path``). For removal request k >= 2 ``model.path`` is the previous request's result."""
    chain = recorded_chain(Path(model_dir).parent)
    return chain["original"]["path"] if chain else default


def read_chain(run_dir: Path) -> dict:
    """The chain of the run ``--after`` names."""
    chain = recorded_chain(run_dir)
    if chain is not None:
        return chain
    raise ConfigError(f"--after {run_dir}: {CHAIN_FILE} missing (not a dsunlearn unlearning run, or made by a version "
                      f"that did not record chains)")


def _plan(cfg: RunConfig, after: Optional[str], hash_models: bool) -> tuple[RunConfig, dict]:
    if after is None and not cfg.model.path:
        raise ConfigError("model.path: expected the model directory to unlearn from (or --after RUN_DIR)")
    if cfg.model.path:
        E.check_model_dir(cfg)  # its own message before any hashing
    digest = (lambda path: model_hash(cfg, path)) if hash_models else (lambda path: None)
    if after is None:
        start = digest(cfg.model.path)
        chain = {"schema_version": SCHEMA_VERSION,
                 "original": {"path": str(Path(cfg.model.path).resolve()), "sha256": start}, "requests": []}
        return cfg, {**chain, "requests": [request_entry(cfg, 1, start, None)]}
    prev = Path(after)
    for needed in ("config.json", "summary.json", "model"):
        if not (prev / needed).exists():
            raise ConfigError(f"--after {after}: {needed} missing: not a finished dsunlearn unlearning run")
    chain = read_chain(prev)
    last = chain["requests"][-1]
    if not (last.get("result_model") or {}).get("sha256"):
        raise ConfigError(f"--after {after}: {CHAIN_FILE} records no result model for request {last['index']} (the "
                          f"run did not finish its export); resume or rerun it first")
    start = digest(str(prev / "model"))
    if start is not None and last["result_model"]["sha256"] != start:
        raise ConfigError(f"--after {after}: model/ changed since that run exported it (content hash differs from "
                          f"{CHAIN_FILE}); the chain's audit trail would be wrong")
    original = chain["original"]
    if cfg.model.path and Path(cfg.model.path).resolve() != Path(original["path"]) \
            and (not hash_models or model_hash(cfg, cfg.model.path) != original["sha256"]):
        raise ConfigError(f"model.path: {cfg.model.path} is not the original model of the chain you continue "
                          f"({original['path']}); a removal request belongs to the model it was made for (leave "
                          f"model.path out, or set it to the original)")
    cfg = with_model(cfg, str(prev / "model"))
    request = request_entry(cfg, len(chain["requests"]) + 1, start, str(prev.resolve()))
    return cfg, {**chain, "requests": chain["requests"] + [request]}


def plan_request(cfg: RunConfig, after: Optional[str], dry_run: bool = False) -> tuple[RunConfig, dict]:
    """(the run config of this request, its chain): rank 0 hashes and checks, every rank gets the result or the
    error: a refusal, or any failure on rank 0 (a corrupt file, an unreadable directory), exits everywhere with
    code 2. ``after``: the previous request's run directory, or None for the first request. A dry run reads and
    writes no weights: the content hashes (a whole checkpoint read) are left out (null) and nothing is memoised."""
    def plan():
        try:
            return _plan(cfg, after, hash_models=not dry_run)
        except OSError as e:
            raise ConfigError(f"--after {after}: {e}" if after else f"model.path: {e}") from None
    return E.from_main(plan, "planning the removal request")


def earlier_forget_sets(chain: dict) -> dict[str, str]:
    """``{"forget@1": path, ...}``: every earlier request's forget set, evaluated at each new request."""
    return {f"forget@{r['index']}": r["forget"] for r in chain["requests"][:-1] if r.get("forget")}


def write_chain(run_dir: str, chain: dict) -> None:
    if E.is_main():
        write_json_atomic(Path(run_dir) / CHAIN_FILE, chain)


def record_result(cfg: RunConfig, run_dir: str) -> Optional[dict]:
    """After the run's last export: the produced model's content hash into this request's entry (rank 0 hashes and
    writes; every rank gets the chain, or the error). Without ``model/`` the entry keeps ``result_model: null``, and
    a later ``--after`` refuses the run."""
    def record():
        path, model = Path(run_dir) / CHAIN_FILE, Path(run_dir) / "model"
        chain = recorded_chain(Path(run_dir))
        if chain is None or not model.is_dir():
            return chain
        chain["requests"][-1]["result_model"] = {"path": str(model.resolve()), "sha256": model_hash(cfg, str(model))}
        write_json_atomic(path, chain)
        return chain
    return E.from_main(record, "recording the chain's result model")
