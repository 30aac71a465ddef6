"""theta_0 for the methods that need it, and the per-chunk labels some methods train on; all computed from theta_0.

- ``reference.mode = "engine"``: a second, frozen ZeRO-3 engine (no optimizer, same sharding: ``zero.reference_config``)
  makes one no-grad forward per micro-step over only the streams that need it (``EngineReference``).
- ``reference.mode = "cache"``: theta_0's outputs are computed once, before training, by a distributed no-grad pass
  (every rank a shard of the chunks, gathered to rank 0, written to disk) and read back per batch
  (``CacheReference``): a sequence log-likelihood per chunk (NPO, exact), per-position top-k log-probs plus the log of
  the remaining mass (KL; the full distribution when ``reference.topk`` >= vocab, exact), or one layer's
  activations (RMU, exact). No second model is in memory during training.
- ``reference.mode = "adapters_off"`` (with a LoRA adapter, ``adapter.py``): the trained engine itself with its
  adapters switched off, one no-grad forward per micro-step (``AdaptersOffReference``): one model in memory.
- precomputed labels (``method.precomputed``): random labels (drawn once with ``train.seed``) and adversarial labels
  (theta_0's argmax excluding the true next token, one distributed pass), stored the same way and sliced into every
  batch by ``Stream.batch``.

The pass that computes a cache or adversarial labels runs on the *trained* engine before its first step and before a
resumed run loads its checkpoint, when it still holds theta_0: cache mode never loads a second model at all.

Storage: ``<cache_dir>/<kind>-<stream>-<key>/`` holding ``meta.json`` and one raw ``<field>.bin`` of fixed-size rows per
field, read row by row with ``pread`` when a batch needs them (never mapped or loaded whole). ``cache_dir`` is
``reference.cache_dir``, by default ``<run_dir>/../.cache/dsunlearn``; every rank must see it. ``key`` is a content
hash of (model files, the stream's token ids, the settings that change the values); when any of them changes the key
changes and the entry is rebuilt (stale entries are left on disk; delete them freely). Entries appear atomically
(written to a temporary directory, renamed when complete). A summary of what was built or reused, with the top-k
truncation statistics of a KL cache, is written to ``<run_dir>/reference.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import engine as E
from .config import ConfigError, RunConfig
from .data import sha256_file
from .data import collate, rank_batches, write_json_atomic, write_text_atomic
from .methods.base import ReferenceOutputs
from .methods.terms import (IGNORE_INDEX, adversarial_targets, reference_distribution, sequence_logprob,
                            next_token_targets)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REFERENCE_KINDS = ("logits", "seq_logprob", "hidden")
LABEL_KINDS = ("random_labels", "adversarial_labels")
_RANDOM_LABELS_STREAM = 0x524C  # salt: random labels never share a random stream with the samplers


# ---------------------------------------------------------------------------------------------------------------------
# Content hashes

def _file_digest(path: Path, memo: dict) -> str:
    """sha256 of a file, memoised by (path, size, mtime): a multi-GB checkpoint is hashed once, not every run."""
    st = path.stat()
    key = str(path.resolve())
    hit = memo.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    memo[key] = [st.st_size, st.st_mtime_ns, sha256_file(path)]
    return memo[key][2]


def model_fingerprint(cfg: RunConfig, cache_dir: Path) -> str:
    """Hash of every file in the model directory (weights, config), plus the seed when theta_0 is a seeded init."""
    memo_path = cache_dir / "file_digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    for f in sorted(Path(cfg.model.path).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + _file_digest(f, memo).encode() + b"\0")
    if getattr(cfg.model, "init", "pretrained") != "pretrained":
        h.update(f"init={cfg.model.init};seed={cfg.train.seed}".encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(memo_path, json.dumps(memo))
    return h.hexdigest()


def chunks_fingerprint(chunks) -> str:
    """Hash of a stream's token ids, chunk by chunk (the Arrow buffers, so it is fast for millions of tokens)."""
    import pyarrow as pa
    table = chunks.with_format("arrow")[:]  # applies any row selection (dropped short chunks)
    column = table.column("input_ids").combine_chunks()
    if isinstance(column, pa.ChunkedArray):
        column = pa.concat_arrays(column.chunks)
    lengths = np.diff(np.asarray(column.offsets, dtype=np.int64))
    values = np.asarray(column.flatten(), dtype=np.int64)
    h = hashlib.sha256()
    h.update(lengths.tobytes())
    h.update(values.tobytes())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir(cfg: RunConfig) -> Path:
    if cfg.reference.cache_dir:
        return Path(cfg.reference.cache_dir)
    return Path(cfg.output.run_dir).resolve().parent / ".cache" / "dsunlearn"


# ---------------------------------------------------------------------------------------------------------------------
# Row stores: fixed-size rows in raw files

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class RowStore:
    """One field of a cache entry: row i (shape ``row_shape``) at byte ``i * row_bytes`` of a raw file."""

    def __init__(self, path: Path, num_rows: int, row_shape: tuple, dtype: torch.dtype):
        self.path, self.num_rows, self.row_shape, self.dtype = Path(path), num_rows, tuple(row_shape), dtype
        self.row_bytes = math.prod(self.row_shape) * torch.empty((), dtype=dtype).element_size()
        self._fd: Optional[int] = None

    def read(self, rows) -> torch.Tensor:
        """Rows ``[len(rows), *row_shape]``, read with pread (only these rows' bytes are touched)."""
        rows = [int(r) for r in rows]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = bytearray(len(rows) * self.row_bytes)
        for i, r in enumerate(rows):
            if not 0 <= r < self.num_rows:
                raise IndexError(f"{self.path}: row {r} of {self.num_rows}")
            data = os.pread(self._fd, self.row_bytes, r * self.row_bytes)
            assert len(data) == self.row_bytes, f"{self.path}: truncated at row {r}"
            buf[i * self.row_bytes:(i + 1) * self.row_bytes] = data
        return torch.frombuffer(buf, dtype=self.dtype).reshape(len(rows), *self.row_shape)

    def __del__(self, _close=os.close):  # os may already be gone at interpreter exit
        if self._fd is not None:
            _close(self._fd)


class _EntryWriter:
    """Rank 0 writes an entry into a temporary directory; ``finish`` adds meta.json and renames it into place."""

    def __init__(self, final: Path, num_rows: int):
        self.final, self.num_rows = final, num_rows
        self.tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.fields: dict[str, dict] = {}
        self._fds: dict[str, int] = {}

    def write(self, rows: list[int], values: dict[str, torch.Tensor]) -> None:
        for name, tensor in values.items():
            tensor = tensor.detach().cpu().contiguous()
            if name not in self.fields:
                self.fields[name] = {"row_shape": list(tensor.shape[1:]), "dtype": _dtype_name(tensor.dtype)}
                fd = os.open(self.tmp / f"{name}.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                row_bytes = tensor[0].numel() * tensor.element_size()
                os.ftruncate(fd, self.num_rows * row_bytes)
                self._fds[name] = fd
            raw = tensor.reshape(len(rows), -1).view(torch.uint8).numpy()
            for i, r in enumerate(rows):
                os.pwrite(self._fds[name], raw[i].tobytes(), int(r) * raw.shape[1])

    def finish(self, meta: dict) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        meta = {**meta, "format": FORMAT_VERSION, "num_rows": self.num_rows, "fields": self.fields}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # another job finished the same entry first: its content is identical by construction
            shutil.rmtree(self.tmp, ignore_errors=True)


def open_entry(path: Path) -> tuple[dict, dict[str, RowStore]]:
    meta = json.loads((Path(path) / "meta.json").read_text())
    stores = {name: RowStore(Path(path) / f"{name}.bin", meta["num_rows"], tuple(spec["row_shape"]),
                             _DTYPES[spec["dtype"]])
              for name, spec in meta["fields"].items()}
    return meta, stores


def _entry_complete(path: Path, key: str) -> bool:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and meta.get("format") == FORMAT_VERSION


# ---------------------------------------------------------------------------------------------------------------------
# theta_0's outputs, in the same form whether they come from an engine or a cache

def reference_outputs(kind: str, logits: torch.Tensor, labels: torch.Tensor, hidden: Optional[torch.Tensor] = None,
                      topk: Optional[int] = None) -> ReferenceOutputs:
    """What a method receives for one stream from theta_0's forward (the cache stores exactly these tensors)."""
    if kind == "logits":
        logprobs, ids, rest = reference_distribution(logits, topk)
        return ReferenceOutputs(topk_logprobs=logprobs, topk_ids=ids, rest_logmass=rest)
    if kind == "seq_logprob":
        return ReferenceOutputs(seq_logprob=sequence_logprob(logits, labels))
    if kind == "hidden":
        return ReferenceOutputs(hidden=hidden)
    raise ValueError(f"unknown reference kind {kind!r}")


def _check_needs(method) -> tuple[dict, Optional[int]]:
    needs = dict(method.reference)
    for stream, kind in needs.items():
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"{type(method).__name__}.reference[{stream!r}] = {kind!r}: expected one of "
                             f"{REFERENCE_KINDS}")
    hidden_index = method.hidden_index if "hidden" in needs.values() else None
    if "hidden" in needs.values() and hidden_index is None:
        raise ValueError(f"{type(method).__name__} needs a 'hidden' reference but has no hidden_index")
    return needs, hidden_index


class EngineReference:
    """theta_0 as a frozen engine (or any module called like one): one no-grad forward per micro-step, over the
    concatenation of only the streams that need it. ``outputs_for`` runs before the trained model's forward, so the
    reference's transient activations and logits are freed before the trained activations exist."""

    def __init__(self, engine, needs: dict, hidden_index: Optional[int] = None, keep_alive=None):
        self.engine, self.needs, self.hidden_index = engine, needs, hidden_index
        self._keep_alive = keep_alive  # HfDeepSpeedConfig of the reference model: must outlive its engine

    def outputs_for(self, streams: dict, device: torch.device) -> dict[str, ReferenceOutputs]:
        names = [n for n in streams if n in self.needs]
        batch = {k: torch.cat([streams[n][k] for n in names]) for k in ("input_ids", "attention_mask", "labels")}
        refs = {}
        with torch.no_grad():
            out = E.forward(self.engine, batch, output_hidden_states=self.hidden_index is not None)
            counts = [streams[n]["input_ids"].size(0) for n in names]
            logits = out.logits.split(counts)
            hidden = out.hidden_states[self.hidden_index].split(counts) if self.hidden_index is not None else None
            for i, n in enumerate(names):
                refs[n] = reference_outputs(self.needs[n], logits[i], streams[n]["labels"].to(device),
                                            hidden[i] if hidden is not None else None)
        return refs


class AdaptersOffReference(EngineReference):
    """theta_0 as the trained engine with its LoRA adapters switched off (``reference.mode = "adapters_off"``,
    ``dsunlearn/adapter.py``): the same no-grad forward as ``EngineReference``, on the one model in memory."""

    def outputs_for(self, streams: dict, device: torch.device) -> dict[str, ReferenceOutputs]:
        from .adapter import adapters_disabled
        with adapters_disabled(self.engine):
            return super().outputs_for(streams, device)


class CacheReference:
    """theta_0's outputs read from disk for the chunks of the batch (``row`` in each stream's batch)."""

    def __init__(self, stores: dict[str, dict[str, RowStore]]):
        self.stores = stores

    def outputs_for(self, streams: dict, device: torch.device) -> dict[str, ReferenceOutputs]:
        refs = {}
        for n, fields in self.stores.items():
            rows = streams[n]["row"].tolist()
            values = {name: store.read(rows).to(device) for name, store in fields.items()}
            if "topk_ids" in values:
                values["topk_ids"] = values["topk_ids"].long()
            refs[n] = ReferenceOutputs(**values)
        return refs


# ---------------------------------------------------------------------------------------------------------------------
# Building entries

def theta0_pass(engine, stream, batch_size: int, seq_len: int, pad_id: int, output_hidden_states: bool,
                compute: Callable, consume: Callable) -> None:
    """A no-grad pass of ``engine`` over every chunk of ``stream``: rank r takes chunks r, r+W, ...; each batch's
    results are gathered and handed to ``consume(rows, values)`` on rank 0.

    Under ZeRO-3 every forward is collective, so every rank runs the same number of forwards (a rank that has run out
    of chunks repeats chunk 0 and drops the result).
    """
    was_training = engine.training
    engine.eval()
    try:
        for rows in rank_batches(stream.stats.num_chunks, batch_size, E.rank(), E.world_size()):
            batch = collate(stream.chunks[rows or [0]]["input_ids"], seq_len, pad_id)
            with torch.no_grad():
                out = E.forward(engine, batch, output_hidden_states=output_hidden_states)
                values = compute(out, batch)
            part = (rows, {k: v[:len(rows)].detach().cpu() for k, v in values.items()})
            for rows_i, values_i in E.all_gather_objects(part):
                if E.is_main() and rows_i:
                    consume(rows_i, values_i)
    finally:
        engine.train(was_training)


class _Stats:
    """Top-k truncation statistics of a KL cache: theta_0's probability mass outside the stored top k."""

    def __init__(self):
        self.total = self.count = 0.0
        self.max = 0.0

    def add(self, rest_sum, count, rest_max):
        self.total += float(rest_sum.sum())
        self.count += float(count.sum())
        self.max = max(self.max, float(rest_max.max()))

    def summary(self) -> dict:
        return {"rest_mass_mean": self.total / max(self.count, 1.0), "rest_mass_max": self.max,
                "positions": int(self.count)}


def _compute_fn(kind: str, topk: Optional[int], hidden_index: Optional[int],
                excluded: Optional[tuple[list[int], int]] = None):
    """(values to store, statistics) of one batch of theta_0's forward, for one kind of entry.

    ``excluded``: for adversarial labels, (special token ids, tokenizer size). Neither a special token nor an id the
    tokenizer never produces (rows of a model's vocabulary padded past ``len(tokenizer)``) is a wrong target: the
    same ids random labels never draw (``_random_label_rows``).
    """

    def compute(out, batch):
        labels = batch["labels"].to(out.logits.device)
        if kind == "adversarial_labels":
            special, num_tokens = excluded
            ids = torch.cat([torch.tensor(special, dtype=torch.long),
                             torch.arange(num_tokens, out.logits.size(-1), dtype=torch.long)])
            return {"labels": adversarial_targets(out.logits, labels, ids).to(torch.int32)}
        ref = reference_outputs(kind, out.logits, labels,
                                out.hidden_states[hidden_index] if kind == "hidden" else None, topk)
        values = {k: v for k, v in vars(ref).items() if v is not None}
        if "topk_ids" in values:
            values["topk_ids"] = values["topk_ids"].to(torch.int32)
            mask = next_token_targets(labels)[1].to(values["rest_logmass"].dtype)
            rest = values["rest_logmass"][:, :-1].exp() * mask
            values.update(_stat_rest_sum=rest.sum(-1), _stat_count=mask.sum(-1), _stat_rest_max=rest.amax(-1))
        return values

    return compute


def _random_label_rows(stream, seq_len: int, pad_id: int, tokenizer, seed: int, consume: Callable) -> None:
    """Uniform over the non-special ids; special tokens keep their label; padding stays IGNORE_INDEX."""
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    allowed = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), special)
    rng = np.random.default_rng([seed, _RANDOM_LABELS_STREAM])
    n = stream.stats.num_chunks
    for start in range(0, n, 1024):
        rows = list(range(start, min(n, start + 1024)))
        labels = collate(stream.chunks[rows]["input_ids"], seq_len, pad_id)["labels"].numpy()
        draws = allowed[rng.integers(0, allowed.size, size=labels.shape)]
        keep = (labels == IGNORE_INDEX) | np.isin(labels, special)
        consume(rows, {"labels": torch.from_numpy(np.where(keep, labels, draws).astype(np.int32))})


def ensure_entry(cfg: RunConfig, kind: str, stream_name: str, stream, engine, tokenizer, batch_size: int,
                 topk: Optional[int] = None, hidden_index: Optional[int] = None,
                 model_fp: Optional[str] = None) -> tuple[dict, dict[str, RowStore]]:
    """Reuse or build one cache entry (collective: every rank calls it). Returns (report, field -> RowStore).

    ``batch_size``: the per-rank batch of this stream in training (``Method.stream_batch_size``): the cache pass then
    runs the very shapes the reference engine would, so cached and engine outputs agree bit for bit."""
    cache_dir = default_cache_dir(cfg)
    seq_len, pad_id = cfg.data.seq_len, tokenizer.pad_token_id
    settings = {"kind": kind, "seq_len": seq_len, "pad_id": pad_id}
    special = sorted(set(tokenizer.all_special_ids))
    if kind == "random_labels":
        settings.update(seed=cfg.train.seed, vocab=len(tokenizer), special=special)
    else:
        settings.update(dtype=_dtype_name(next(iter(engine.parameters())).dtype))
    if kind == "logits":
        settings["topk"] = topk
    if kind == "hidden":
        settings["hidden_index"] = hidden_index
    if kind == "adversarial_labels":  # the excluded ids are part of what the labels mean
        settings.update(vocab=len(tokenizer), special=special)
    key = path = None
    if E.is_main():
        parts = {"data": chunks_fingerprint(stream.chunks), **settings}
        if kind != "random_labels":
            parts["model"] = model_fp or model_fingerprint(cfg, cache_dir)
        key = cache_key(parts)
        path = cache_dir / f"{kind}-{stream_name}-{key}"
    key, path = E.broadcast_object((key, path))
    exists = E.broadcast_object(_entry_complete(path, key) if E.is_main() else None)
    start = time.perf_counter()
    stats = _Stats()
    if not exists:
        writer = _EntryWriter(path, stream.stats.num_chunks) if E.is_main() else None

        def consume(rows, values):
            if "_stat_count" in values:
                stats.add(values.pop("_stat_rest_sum"), values.pop("_stat_count"), values.pop("_stat_rest_max"))
            writer.write(rows, values)

        if kind == "random_labels":
            if E.is_main():
                _random_label_rows(stream, seq_len, pad_id, tokenizer, cfg.train.seed, consume)
        else:
            theta0_pass(engine, stream, batch_size, seq_len, pad_id, kind == "hidden",
                        _compute_fn(kind, topk, hidden_index, (special, len(tokenizer))), consume)
        if E.is_main():
            extra = {"topk_stats": stats.summary()} if stats.count else {}
            writer.finish({"key": key, "kind": kind, "stream": stream_name, "settings": settings, **extra})
        E.barrier()
    meta, stores = open_entry(path)
    report = {"path": str(path), "key": key, "built": not exists,
              "seconds": round(time.perf_counter() - start, 3) if not exists else 0.0}
    if "topk_stats" in meta:
        report["topk_stats"] = meta["topk_stats"]
    if E.is_main():
        log.info("%s %s/%s: %s", "built" if not exists else "reused", kind, stream_name, path)
    return report, stores


def _write_report(cfg: RunConfig, section: str, entries: dict) -> None:
    if not E.is_main() or not entries:
        return
    path = Path(cfg.output.run_dir) / "reference.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[section] = entries
    write_json_atomic(path, data)


# ---------------------------------------------------------------------------------------------------------------------
# What the loop calls (collectively, every rank), after the trained engine is built and before any step or resume

def attach_precomputed(cfg: RunConfig, method, engine, streams: dict, tokenizer) -> dict:
    """Compute or reuse the per-chunk labels the method declares in ``precomputed`` and attach them to the streams
    (``Stream.fields``), so every batch carries them into ``StreamOutputs.extra``."""
    entries = {}
    for stream_name, kind in method.precomputed.items():
        if kind not in LABEL_KINDS:
            raise ValueError(f"{type(method).__name__}.precomputed[{stream_name!r}] = {kind!r}: expected one of "
                             f"{LABEL_KINDS}")
        report, stores = ensure_entry(cfg, kind, stream_name, streams[stream_name], engine, tokenizer,
                                      method.stream_batch_size(stream_name, cfg.train))
        store = stores["labels"]
        streams[stream_name].fields[kind] = lambda rows, store=store: store.read(rows).long()
        entries[f"{kind}/{stream_name}"] = report
    _write_report(cfg, "precomputed", entries)
    return entries


def build_reference(cfg: RunConfig, ds_config: dict, method, engine, streams: dict, tokenizer):
    """The method's theta_0: None when it needs none, else an EngineReference or a CacheReference."""
    needs, hidden_index = _check_needs(method)
    if not needs:
        return None
    if cfg.reference.mode == "engine":
        from .zero import reference_config
        ref_cfg = reference_config(ds_config)
        start = time.perf_counter()
        from .prepare import with_model
        source = with_model(cfg, cfg.reference.path) if cfg.reference.path else cfg
        model, handle = E.load_model(source, ref_cfg, path=cfg.reference.path)
        ref_engine = E.build_frozen_engine(model, ref_cfg)
        _write_report(cfg, "reference", {"mode": "engine", "streams": needs,
                                         "seconds": round(time.perf_counter() - start, 3)})
        return EngineReference(ref_engine, needs, hidden_index, keep_alive=handle)
    if cfg.reference.mode == "adapters_off":
        _write_report(cfg, "reference", {"mode": "adapters_off", "streams": needs})
        return AdaptersOffReference(engine, needs, hidden_index)
    if cfg.reference.mode != "cache":
        raise ConfigError(f"reference.mode: expected 'engine', 'cache' or 'adapters_off', got {cfg.reference.mode!r}")
    vocab = getattr(E.load_model_config(cfg), "vocab_size", None)
    model_fp = model_fingerprint(cfg, default_cache_dir(cfg)) if E.is_main() else None
    stores, entries = {}, {}
    for stream_name, kind in needs.items():
        topk = cfg.reference.topk if kind == "logits" else None
        if topk is not None and vocab is not None and topk >= vocab:
            topk = None  # the full distribution: exact, and stored without ids
        report, stores[stream_name] = ensure_entry(cfg, kind, stream_name, streams[stream_name], engine, tokenizer,
                                                   method.stream_batch_size(stream_name, cfg.train), topk=topk, hidden_index=hidden_index, model_fp=model_fp)
        if kind == "logits":
            report.update(topk=cfg.reference.topk, vocab=vocab, exact=topk is None)
            if topk is not None and E.is_main():
                s = report.get("topk_stats", {})
                log.info("KL cache keeps theta_0's top %d of %s tokens: mass outside it mean %.3g, max %.3g per "
                         "position; the cached KL is a lower bound of the exact KL, short by at most that mass "
                         "times the KL within it", topk, vocab, s.get("rest_mass_mean", float("nan")),
                         s.get("rest_mass_max", float("nan")))
        entries[f"{kind}/{stream_name}"] = report
    _write_report(cfg, "reference", {"mode": "cache", "streams": needs, "entries": entries})
    return CacheReference(stores)
