"""Documents -> fixed-length token chunks -> per-rank micro-batches.

- Inputs: JSONL (one object per line, text in ``data.text_field``), JSON, parquet, a folder of .txt/.md/.py files (one
  document per file), or a folder written by ``datasets.save_to_disk``. Loading, tokenising and caching go through the
  ``datasets`` library (its fingerprint cache makes the second run free).
- Each document is tokenised on its own (plus EOS), cut into chunks of ``seq_len`` tokens; documents are never packed
  together, so the last chunk of a document is shorter and is padded; padding is masked from every loss and metric.
  Chunks with fewer than ``min_chunk_tokens`` real tokens are dropped and counted.
- Sampling is a pure function of (seed, step): the chunks of global optimizer step s are positions [s*G, (s+1)*G) of a
  per-epoch seeded permutation, dealt out to ranks and micro-steps. The global batch is the same whatever the world
  size, and resuming needs nothing but the step number.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import ConfigError
from .constants import IGNORE_INDEX

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".tex", ".rst")


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks (checkpoints can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half of it (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, path)


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``, kernel >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # os.umask can only read the mask by setting one: for an instant another thread's new file gets 022.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory) -> None:
    """Give every regular file under ``directory`` the mode ``open()`` would have: ``0o666 & ~umask``.

    safetensors 0.8.0 ``save_file`` (behind ``save_pretrained``) writes through a Rust ``tempfile::NamedTempFile``,
    created 0600 whatever the umask, and renames it: exported ``model.safetensors`` files were unreadable to the group
    while every other run-dir file followed the umask. Call it on a directory this process has just written.
    """
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_json_atomic(path, data, **dump_kwargs) -> None:
    """``write_text_atomic`` of ``json.dumps(data, indent=2, **dump_kwargs)`` plus a final newline."""
    write_text_atomic(path, json.dumps(data, indent=2, **dump_kwargs) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Loading documents

def _check_jsonl(path: Path, text_field: str) -> int:
    """Validate a JSONL file line by line (datasets' own errors do not name the line). Returns the number of rows."""
    rows = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise ConfigError(f"{path}:{lineno}: missing text field {text_field!r} (set data.text_field)")
            if not isinstance(obj[text_field], str):
                raise ConfigError(f"{path}:{lineno}: field {text_field!r} is not a string")
            rows += 1
    if rows == 0:
        raise ConfigError(f"{path}: empty file (no JSON lines)")
    return rows


def load_documents(path: str, text_field: str = "text"):
    """Load a document set as a ``datasets.Dataset`` with a ``text`` column (and ``id`` when the source has one)."""
    ds = load_records(path, text_field)
    if text_field != "text":
        # A source may carry an unrelated "text" column next to the chosen field: the chosen field wins.
        if "text" in ds.column_names:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(text_field, "text")
    return ds


def load_records(path: str, text_field: str = "text"):
    """Like :func:`load_documents`, validated the same way, but with every column under its original name."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: data file or folder not found")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
            ds = ds["train"]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"{path}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
        texts, ids = [], []
        for f in files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{f}: not UTF-8 (byte {e.start})") from None
            ids.append(str(f.relative_to(p)))
        ds = datasets.Dataset.from_dict({"id": ids, text_field: texts})
    elif p.suffix in (".jsonl", ".json"):
        if p.stat().st_size == 0:
            raise ConfigError(f"{path}: empty file")
        if p.suffix == ".jsonl" or p.read_bytes()[:1] != b"[":
            _check_jsonl(p, text_field)
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    elif p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    elif p.suffix in TEXT_SUFFIXES:
        try:
            ds = datasets.Dataset.from_dict({"id": [p.name], text_field: [p.read_text(encoding="utf-8")]})
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    else:
        raise ConfigError(f"{path}: unknown data format (expected .jsonl, .json, .parquet, a text folder or a "
                          f"save_to_disk folder)")
    if text_field not in ds.column_names:
        raise ConfigError(f"{path}: missing text field {text_field!r}; columns: {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise ConfigError(f"{path}: no documents")
    return ds


# ---------------------------------------------------------------------------------------------------------------------
# Chunking

def chunk_token_ids(ids: list[int], seq_len: int) -> list[list[int]]:
    """Cut one document's token ids into consecutive pieces of at most ``seq_len``."""
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


@dataclass(frozen=True)
class ChunkStats:
    num_documents: int
    num_chunks: int
    num_tokens: int
    num_dropped_chunks: int
    num_dropped_tokens: int


def tokenize_and_chunk(ds, tokenizer, seq_len: int, min_chunk_tokens: int = 16, add_eos: bool = True,
                       num_proc: Optional[int] = None, source: str = "data"):
    """Tokenise every document and cut it into chunks. Returns ``(chunks_dataset, ChunkStats)``.

    Columns: ``input_ids`` (unpadded, 1..seq_len tokens), ``doc_index``, ``chunk_index``, ``num_tokens``.
    """
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ConfigError(f"{source}: the tokenizer has no EOS token; set data.add_eos=false")

    def _map(batch, indices):
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "doc_index": [], "chunk_index": [], "num_tokens": []}
        for doc_index, ids in zip(indices, encoded):
            if eos is not None:
                ids = ids + [eos]
            for j, piece in enumerate(chunk_token_ids(ids, seq_len)):
                out["input_ids"].append(piece)
                out["doc_index"].append(doc_index)
                out["chunk_index"].append(j)
                out["num_tokens"].append(len(piece))
        return out

    chunks = ds.map(_map, batched=True, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc,
                    desc=f"tokenise {source}")
    lengths = np.asarray(chunks["num_tokens"], dtype=np.int64)
    keep = np.flatnonzero(lengths >= min_chunk_tokens)
    stats = ChunkStats(num_documents=len(ds), num_chunks=int(keep.size), num_tokens=int(lengths[keep].sum()),
                       num_dropped_chunks=int(lengths.size - keep.size),
                       num_dropped_tokens=int(lengths.sum() - lengths[keep].sum()))
    if keep.size < lengths.size:
        chunks = chunks.select(keep)
    if stats.num_chunks == 0:
        raise ConfigError(f"{source}: zero usable chunks ({stats.num_dropped_chunks} chunks shorter than "
                          f"data.min_chunk_tokens={min_chunk_tokens})")
    if stats.num_dropped_chunks:
        log.info("%s: dropped %d chunks (%d tokens) shorter than %d tokens", source, stats.num_dropped_chunks,
                 stats.num_dropped_tokens, min_chunk_tokens)
    return chunks, stats


def collate(rows: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chunks to ``seq_len``: input_ids, attention_mask, labels (-100 on padding)."""
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------------
# Sampling

@dataclass(frozen=True)
class StreamSampler:
    """Which chunks a rank takes at a given (optimizer step, micro-step): a pure function, so resume is exact.

    ``per_rank`` chunks per micro-step; global batch per optimizer step G = per_rank * grad_accum * world_size.
    Position p of the infinite stream is chunk ``perm_e[p % N]`` with epoch e = p // N and ``perm_e`` a permutation
    seeded by (seed, e).
    """
    num_chunks: int
    per_rank: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.grad_accum * self.world_size

    def _chunk_at(self, positions: np.ndarray) -> np.ndarray:
        epochs = positions // self.num_chunks
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(self.num_chunks)
            sel = epochs == e
            out[sel] = perm[positions[sel] % self.num_chunks]
        return out

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.per_rank
        return self._chunk_at(np.arange(start, start + self.per_rank, dtype=np.int64)).tolist()


def rank_batches(num_items: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """No-grad passes over a whole set (evaluation, theta_0 caches): rank r takes items r, r+W, r+2W, ... in batches.

    Every rank gets the SAME number of batches (under ZeRO-3 each forward is collective); a rank's last batches may be
    short or empty, and the caller pads them with a repeated item whose result it drops.
    """
    mine = list(range(rank, num_items, world_size))
    num_batches = math.ceil(math.ceil(num_items / world_size) / batch_size)
    return [mine[b * batch_size:(b + 1) * batch_size] for b in range(num_batches)]



# ---------------------------------------------------------------------------------------------------------------------
# Streams: the tokenised sets a run samples from

@dataclass
class Stream:
    """A tokenised set, ready for sampling."""
    name: str
    source: str
    chunks: object  # datasets.Dataset of chunks
    stats: object
    fields: dict = field(default_factory=dict)
    """Per-chunk fields computed once before training (e.g. "random_labels"): name -> (rows -> [len(rows), ...])."""

    def batch(self, indices: list[int], seq_len: int, pad_id: int) -> dict:
        out = collate(self.chunks[indices]["input_ids"], seq_len, pad_id)
        out["row"] = torch.as_tensor(indices, dtype=torch.long)  # lets a reference cache find these chunks
        out.update({name: read(indices) for name, read in self.fields.items()})
        return out


def load_stream(name: str, path: str, data_cfg, tokenizer) -> Stream:
    """One set of the run config's ``data`` section (``data_cfg``), tokenised and chunked."""
    docs = load_documents(path, data_cfg.text_field)
    chunks, stats = tokenize_and_chunk(docs, tokenizer, data_cfg.seq_len, data_cfg.min_chunk_tokens,
                                       data_cfg.add_eos, data_cfg.num_proc, source=f"data.{name} ({path})")
    return Stream(name=name, source=path, chunks=chunks, stats=stats)


def stream_sources(data_cfg, streams: tuple, method_name: str) -> dict[str, str]:
    """Which file feeds each stream a method declares (the retain stream reads ``data.retain_source``)."""
    out = {}
    for name in streams:
        key = data_cfg.retain_source if name == "retain" else name
        path = getattr(data_cfg, key, None)
        if not path:
            raise ConfigError(f"data.{key}: required by method {method_name!r} (stream {name!r})")
        out[name] = path
    return out
