"""A local copy of a MUSE corpus (Shi et al. 2024, arXiv 2407.06460) as a run's data and generated metrics.

MUSE ships each corpus (News, Books) as subsets, each a folder of splits: ``raw/{forget,retain1,retain2,holdout}``,
``verbmem/forget``, ``knowmem/{forget_qa,retain_qa}`` (+ ``_icl`` in-context examples; the Hugging Face copy names
the retain side ``retain2_qa``), ``privleak/...``. A split is a ``.json`` list, ``.jsonl``, ``.parquet`` (the Hugging
Face copy's ``<split>-00000-of-00001.parquet``) or, for ``raw``, a ``.txt`` file. Field names are MUSE's own:
``text``; ``prompt`` / ``gt``; ``question`` / ``answer``. Nothing is downloaded: ``data.muse`` names the folder.

``raw/forget`` is unlearned, ``raw/retain1`` (MUSE's unlearning retain set; else ``retain2``) is the retain stream and
``raw/holdout`` (text the target model never saw) the approximate set. PrivLeak is already computed on forget vs
approximate; MUSE's Min-40% is reported next to ours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import ConfigError

SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")

# run-config field -> (the MUSE subset, its splits it is read from, in order of preference)
FIELDS = {
    ("data", "forget"): ("raw", ("forget",)),
    ("data", "retain"): ("raw", ("retain1", "retain2")),
    ("data", "approximate"): ("raw", ("holdout",)),
    ("eval", "verbmem_file"): ("verbmem", ("forget",)),
    ("eval", "knowmem_forget"): ("knowmem", ("forget_qa", "forget-qa")),
    ("eval", "knowmem_retain"): ("knowmem", ("retain_qa", "retain2_qa", "retain-qa", "retain2-qa")),
}
REQUIRED = {("data", "forget"), ("data", "approximate")}


def find_split(folder: Path, names: tuple) -> Optional[Path]:
    """The first of ``names`` present in ``folder`` in any of MUSE's file forms."""
    for name in names:
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
        shards = sorted(folder.glob(f"{name}-0*-of-*.parquet"))
        if shards:
            return shards[0]
    return None


def resolve_muse(data: dict) -> dict:
    """A run-config dict with every field of ``FIELDS`` read from ``data.muse`` (unchanged without it). A field the
    user also set is an error (one owner per knob; the same file, as in a resolved config, is not a conflict); a
    folder without the forget or holdout split is an error naming what is missing."""
    muse = (data.get("data") or {}).get("muse") if isinstance(data.get("data"), dict) else None
    if not muse:
        return data
    root = Path(muse)
    if not root.is_dir():
        raise ConfigError(f"data.muse: {root}: not a folder (expected a MUSE corpus: raw/, verbmem/, knowmem/)")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (section, name), (subset, names) in FIELDS.items():
        path = find_split(root / subset, names)
        if path is None:
            if (section, name) in REQUIRED:
                raise ConfigError(f"data.muse: {root}: no {subset}/{names[0]} (.json, .jsonl, .parquet or .txt)")
            continue
        values = out.setdefault(section, {})
        if not isinstance(values, dict):
            continue  # from_dict names the malformed section
        current = values.get(name)
        if current and Path(current) != path:
            raise ConfigError(f"{section}.{name}: set by data.muse ({path}); remove one of the two")
        values[name] = str(path)
    return out
