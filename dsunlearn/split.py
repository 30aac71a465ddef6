"""Build forget / retain / approximate / general sets from a corpus, at the document level (``dsunlearn data split``).

    dsunlearn data split --input corpus.jsonl --out sets/ --random --seed 0 --num-forget 200
    dsunlearn data split --input corpus.jsonl --out sets/ --forget-ids forget_ids.txt
    dsunlearn data split --input corpus.jsonl --out sets/ --date-field published --cutoff 2024-06-30
    dsunlearn data check --config run.json

Three modes, all deterministic in (corpus, settings, seed) and independent of the order of the input documents when
they carry ids (documents are sorted by id before sampling; without an id field, input order is the order):

- ``random``: a seeded shuffle; forget = the first ``num_forget``, approximate = the next ``num_approximate`` (default:
  as many as forget), retain = the rest. One pool, so forget and approximate differ in membership only: the split
  ``docs/evaluation.md`` recommends.
- ``ids``: forget = the listed ids; approximate = a seeded sample of the other documents, held out; retain = the rest.
- ``date``: documents dated after the cut-off are "unseen" = approximate (all of them, or a seeded sample of
  ``num_approximate``); forget = a seeded sample of the documents dated on or before it; retain = the remaining
  ones. A time split usually shifts topic and vocabulary too: run ``dsunlearn data check`` on the result.

Each set is written as JSONL with every original field of its documents (JSON/JSONL inputs are copied record by
record, untouched), plus ``manifest.json``: per set the file, its sha256, documents, characters, and chunks/tokens
when a tokenizer is given (counted with the same chunking as training, ``data.tokenize_and_chunk``); the source and
its sha256; the settings. No timestamps: equal inputs give byte-identical outputs.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError
from .data import _check_jsonl, load_records, sha256_file, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

SETS = ("forget", "retain", "approximate", "general")
MODES = ("random", "ids", "date")
DEFAULT_FORGET_FRACTION = 0.1


@dataclass(frozen=True)
class SplitSettings:
    """Everything a split depends on besides the corpus (written into the manifest)."""
    mode: str
    seed: int = 0
    text_field: str = "text"
    id_field: str = "id"
    num_forget: Optional[int] = None
    """Forget documents (random and date modes); exclusive with forget_fraction."""
    forget_fraction: Optional[float] = None
    """Forget documents as a fraction of the pool (all documents; date mode: those on or before the cut-off).
    Default 0.1 when neither this nor num_forget is given."""
    num_approximate: Optional[int] = None
    """Approximate documents. Default: as many as forget (random, ids); every document after the cut-off (date)."""
    date_field: Optional[str] = None
    cutoff: Optional[str] = None
    """YYYY-MM-DD; documents dated strictly after it are unseen. A document dated on the cut-off day is seen."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading

def read_records(path: str, text_field: str = "text") -> list[dict]:
    """Every document of a corpus as a dict with all its fields.

    JSONL / JSON-array files are read with ``json`` (values exactly as written: ``datasets`` would turn date strings
    into timestamps); other formats (parquet, a text folder, a ``save_to_disk`` folder) through ``data.load_records``.
    Errors name the file (and line or row).
    """
    p = Path(path)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        if p.stat().st_size == 0:
            raise ConfigError(f"{path}: empty file")
        raw = p.read_bytes()
        if p.suffix == ".json" and raw.lstrip()[:1] == b"[":
            try:
                records = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
            for i, r in enumerate(records):
                if not isinstance(r, dict) or not isinstance(r.get(text_field), str):
                    raise ConfigError(f"{path}: item {i}: missing text field {text_field!r} (or not a string)")
            if not records:
                raise ConfigError(f"{path}: no documents")
            return records
        _check_jsonl(p, text_field)
        return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    records = load_records(path, text_field).to_list()
    for i, r in enumerate(records):
        if not isinstance(r.get(text_field), str):
            raise ConfigError(f"{path}: row {i}: field {text_field!r} is not a string")
    return records


def source_sha256(path: str) -> str:
    """sha256 of a file, or of a folder's (relative path, file sha256) list."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_id_list(path: str) -> list[str]:
    """Ids to forget: a JSON array (``.json``) or one id per line (blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: id list not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    if p.suffix == ".json":
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(ids, list):
            raise ConfigError(f"{path}: expected a JSON array of ids")
        ids = [str(i) for i in ids]
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ConfigError(f"{path}: no ids")
    seen: set = set()
    for i in ids:
        if i in seen:
            raise ConfigError(f"{path}: id {i!r} listed twice")
        seen.add(i)
    return ids


def parse_date(value, where: str) -> dt.date:
    """An ISO 8601 date or date-time (string, ``datetime`` or ``date``) -> its calendar date."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip()).date()
        except ValueError:
            pass
    raise ConfigError(f"{where}: cannot parse date {value!r} (expected ISO 8601, e.g. 2024-06-30 or "
                      f"2024-06-30T12:00:00Z)")


# ---------------------------------------------------------------------------------------------------------------------
# Splitting (pure)

def document_ids(records: Sequence[dict], id_field: str, source: str, required: bool) -> Optional[list[str]]:
    """The id of every record as a string; None when the corpus has no such field and ids are optional."""
    has = [id_field in r and r[id_field] is not None for r in records]
    if not any(has):
        if required:
            raise ConfigError(f"{source}: missing id field {id_field!r} (set --id-field)")
        return None
    if not all(has):
        raise ConfigError(f"{source}: document {has.index(False)} (0-based) has no id field {id_field!r}")
    ids = [str(r[id_field]) for r in records]
    seen: dict = {}
    for i, x in enumerate(ids):
        if x in seen:
            raise ConfigError(f"{source}: duplicate id {x!r} (documents {seen[x]} and {i})")
        seen[x] = i
    return ids


def _count(fraction: Optional[float], number: Optional[int], pool: int, what: str) -> int:
    if fraction is not None and number is not None:
        raise ConfigError("give --num-forget or --forget-fraction, not both")
    if number is not None:
        if number < 1:
            raise ConfigError(f"--num-{what}: expected >= 1, got {number}")
        return number
    fraction = DEFAULT_FORGET_FRACTION if fraction is None else fraction
    if not 0 < fraction < 1:
        raise ConfigError(f"--{what}-fraction: expected 0 < x < 1, got {fraction}")
    return max(1, round(fraction * pool))


def _shuffled(items: list[int], seed: int, tag: str) -> list[int]:
    # A string seed is hashed with sha512 by random.Random: stable across Python versions and platforms.
    out = list(items)
    random.Random(f"dsunlearn-split/{seed}/{tag}").shuffle(out)
    return out


def split_indices(records: Sequence[dict], settings: SplitSettings, *, forget_ids: Sequence[str] = (),
                  source: str = "input") -> dict[str, list[int]]:
    """Indices into ``records`` of the forget, retain and approximate sets (and "unused"), each in document order.

    Document order is id order when the records have ids, input order otherwise. Raises ``ConfigError`` for unknown
    ids, missing id/date fields, unparsable dates and empty sets.
    """
    s = settings
    if s.mode not in MODES:
        raise ConfigError(f"split mode: expected one of {', '.join(MODES)}, got {s.mode!r}")
    if not records:
        raise ConfigError(f"{source}: no documents")
    if s.num_approximate is not None and s.num_approximate < 1:
        raise ConfigError(f"--num-approximate: expected >= 1, got {s.num_approximate}")
    ids = document_ids(records, s.id_field, source, required=s.mode == "ids")
    if ids is None:
        ids = [f"row {i}" for i in range(len(records))]
        order = list(range(len(records)))
    else:
        order = sorted(range(len(records)), key=ids.__getitem__)
    sets: dict[str, list[int]] = {"forget": [], "retain": [], "approximate": [], "unused": []}

    if s.mode == "random":
        n_f = _count(s.forget_fraction, s.num_forget, len(order), "forget")
        n_a = s.num_approximate if s.num_approximate is not None else n_f
        _need(n_f + n_a + 1, len(order), f"{source}: {len(order)} documents are too few for {n_f} forget + {n_a} "
                                         f"approximate documents and a non-empty retain set")
        pool = _shuffled(order, s.seed, "random")
        sets["forget"], sets["approximate"], sets["retain"] = pool[:n_f], pool[n_f:n_f + n_a], pool[n_f + n_a:]

    elif s.mode == "ids":
        if s.num_forget is not None or s.forget_fraction is not None:
            raise ConfigError("--num-forget/--forget-fraction: the id list already fixes the forget set")
        where = {x: i for i, x in enumerate(ids)}
        unknown = [x for x in forget_ids if x not in where]
        if unknown:
            raise ConfigError(f"{len(unknown)} forget id(s) not in {source} (field {s.id_field!r}): "
                              f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}")
        listed = {where[x] for x in forget_ids}
        rest = [i for i in order if i not in listed]
        n_a = s.num_approximate if s.num_approximate is not None else len(listed)
        _need(n_a + 1, len(rest), f"{source}: {len(rest)} documents besides the {len(listed)} listed are too few "
                                  f"for {n_a} approximate documents and a non-empty retain set")
        pool = _shuffled(rest, s.seed, "ids")
        sets["forget"] = [i for i in order if i in listed]
        sets["approximate"], sets["retain"] = pool[:n_a], pool[n_a:]

    else:  # date
        if not s.date_field or not s.cutoff:
            raise ConfigError("date split: give both --date-field and --cutoff")
        try:
            cutoff = dt.date.fromisoformat(s.cutoff)
        except ValueError:
            raise ConfigError(f"--cutoff: expected YYYY-MM-DD, got {s.cutoff!r}") from None
        before, after = [], []
        for i in order:
            r = records[i]
            doc = f"{source}: document {ids[i]!r}"
            if r.get(s.date_field) is None:
                raise ConfigError(f"{doc}: missing date field {s.date_field!r}")
            (after if parse_date(r[s.date_field], f"{doc}, field {s.date_field!r}") > cutoff else before).append(i)
        if not after:
            raise ConfigError(f"{source}: no document dated after {s.cutoff}: the approximate set would be empty")
        n_f = _count(s.forget_fraction, s.num_forget, len(before), "forget")
        _need(n_f + 1, len(before), f"{source}: {len(before)} documents dated on or before {s.cutoff} are too few "
                                    f"for {n_f} forget documents and a non-empty retain set")
        pool = _shuffled(before, s.seed, "date/before")
        sets["forget"], sets["retain"] = pool[:n_f], pool[n_f:]
        if s.num_approximate is None:
            sets["approximate"] = after
        else:
            _need(s.num_approximate, len(after), f"{source}: {len(after)} documents dated after {s.cutoff} are "
                                                 f"too few for {s.num_approximate} approximate documents")
            late = _shuffled(after, s.seed, "date/after")
            sets["approximate"], sets["unused"] = late[:s.num_approximate], late[s.num_approximate:]

    rank = {i: k for k, i in enumerate(order)}
    out = {name: sorted(idx, key=rank.__getitem__) for name, idx in sets.items()}
    assert all(out[name] for name in ("forget", "retain", "approximate")), "the size checks above let an empty set by"
    return out


def _need(needed: int, available: int, message: str) -> None:
    if needed > available:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Writing

def _json_default(value):
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    raise TypeError(f"a value of type {type(value).__name__} cannot be written as JSON")


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One record per line, keys in their original order, UTF-8, atomically."""
    try:
        text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    write_text_atomic(path, text)


def chunk_counts(texts: list[str], tokenizer, seq_len: int, min_chunk_tokens: int, add_eos: bool,
                 source: str) -> dict:
    """Chunks and tokens of a set, counted exactly as training will cut it (a set with zero chunks is an error)."""
    import datasets

    from .data import tokenize_and_chunk
    _, stats = tokenize_and_chunk(datasets.Dataset.from_dict({"text": texts}), tokenizer, seq_len, min_chunk_tokens,
                                  add_eos, source=source)
    return {"num_chunks": stats.num_chunks, "num_tokens": stats.num_tokens,
            "num_dropped_chunks": stats.num_dropped_chunks, "num_dropped_tokens": stats.num_dropped_tokens}


def split_corpus(input_path: str, out_dir: str, settings: SplitSettings, *, forget_ids_path: Optional[str] = None,
                 general_path: Optional[str] = None, tokenizer_dir: Optional[str] = None, seq_len: int = 4096,
                 min_chunk_tokens: int = 16, add_eos: bool = True, overwrite: bool = False) -> dict:
    """Read, split, count and write; returns the manifest. Every input is validated before anything is written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a directory")
    ours = [out / f"{n}.jsonl" for n in SETS] + [out / "manifest.json"]
    if not overwrite and out.is_dir() and any(p.exists() for p in ours):
        raise ConfigError(f"--out {out_dir}: already holds a split; pass --overwrite to replace it")
    if settings.mode == "ids" and not forget_ids_path:
        raise ConfigError("ids split: give --forget-ids FILE")
    if general_path and Path(general_path).resolve() == Path(input_path).resolve():
        raise ConfigError(f"--general {general_path}: is the input corpus itself; give text from another source")

    records = read_records(input_path, settings.text_field)
    forget_ids = read_id_list(forget_ids_path) if settings.mode == "ids" else []
    index = split_indices(records, settings, forget_ids=forget_ids, source=input_path)
    sets = {name: [records[i] for i in index[name]] for name in ("forget", "retain", "approximate")}
    if general_path:
        sets["general"] = read_records(general_path, settings.text_field)

    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer ({str(e).splitlines()[0]})") \
                from None
    entries = {}
    for name, docs in sets.items():
        texts = [d[settings.text_field] for d in docs]
        entry = {"file": f"{name}.jsonl", "num_documents": len(docs), "num_chars": sum(map(len, texts))}
        if tokenizer is not None:
            entry.update(chunk_counts(texts, tokenizer, seq_len, min_chunk_tokens, add_eos, f"{name} set"))
        entries[name] = entry
    if "general" in sets:
        seen = {d[settings.text_field].strip() for name in ("forget", "approximate") for d in sets[name]}
        shared = sum(d[settings.text_field].strip() in seen for d in sets["general"])
        entries["general"]["num_shared_with_forget_or_approximate"] = shared
        if shared:
            log.warning("general set: %d documents also occur verbatim in the forget or approximate set", shared)

    out.mkdir(parents=True, exist_ok=True)
    for name in SETS:
        path = out / f"{name}.jsonl"
        if name in sets:
            write_jsonl(path, sets[name])
            entries[name]["sha256"] = sha256_file(path)
        elif path.exists():  # a stale general set from an earlier split would contradict the manifest
            path.unlink()
    manifest = {
        "source": {"path": str(input_path), "sha256": source_sha256(input_path), "num_documents": len(records)},
        "settings": asdict(settings),
        "sets": entries,
        "num_unused": len(index["unused"]),
    }
    if forget_ids_path:
        manifest["settings"]["forget_ids"] = {"path": str(forget_ids_path), "sha256": sha256_file(Path(forget_ids_path)),
                                              "num_ids": len(forget_ids)}
    if general_path:
        manifest["settings"]["general"] = {"path": str(general_path), "sha256": source_sha256(general_path)}
    if tokenizer_dir:
        manifest["settings"]["tokenizer"] = {"path": str(tokenizer_dir), "seq_len": seq_len,
                                             "min_chunk_tokens": min_chunk_tokens, "add_eos": add_eos}
    write_json_atomic(out / "manifest.json", manifest, sort_keys=True)
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Checking a run's split (``dsunlearn data check``)

def check_run_data(cfg, *, auc_band: float = 0.1, seed: int = 0, folds: int = 5, tokenizer=None,
                   forget_loss=None, approx_loss=None):
    """``eval.shift.check_split`` on the run config's forget vs approximate documents.

    The original model's losses are optional (``unlearn``/``eval`` pass them). When the documents carry a ``domain``
    field the blind baseline's folds are stratified by domain too.
    """
    from .data import load_documents
    from .eval.shift import check_split
    missing = [k for k in ("forget", "approximate") if not getattr(cfg.data, k)]
    if missing:
        raise ConfigError(f"data.{missing[0]}: required by the approximate-set check")
    forget_docs = load_documents(cfg.data.forget, cfg.data.text_field)
    approx_docs = load_documents(cfg.data.approximate, cfg.data.text_field)
    strata = None
    if "domain" in forget_docs.column_names and "domain" in approx_docs.column_names:
        strata = list(forget_docs["domain"]) + list(approx_docs["domain"])
    tokenize = (lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer is not None else None
    try:
        return check_split(list(forget_docs["text"]), list(approx_docs["text"]), forget_loss=forget_loss,
                           approx_loss=approx_loss, auc_band=auc_band, seed=seed, folds=folds, tokenize=tokenize,
                           strata=strata)
    except ValueError as e:  # bad band/folds: the user's to fix
        raise ConfigError(f"data check: {e}") from None
