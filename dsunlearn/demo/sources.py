"""Fetch and extract the demo world's documents: books, papers and code, all from registries (no model/data hub).

Every document is a dict `{"id", "domain", "source", "text"}`; ids are stable paths such as
`books/austen/emma/ch03`, `papers/sandwich/sandwich-CL/sec02`, `code/cpython/json/decoder.py`.

- books: Jane Austen's six novels (Debian `r-cran-janeaustenr`) and Moby Dick (`r-cran-tokenizers`), one document
  per chapter; Bierce's Devil's Dictionary (`dict-devil`), one document per initial letter.
- papers: the LaTeX/Markdown prose of R package vignettes (`r-cran-*`, mostly Journal of Statistical Software
  articles), R code chunks removed, one document per top-level section. GPL: fetched at build time, never committed.
- code: the CPython standard library of the running interpreter, one document per module file.

Debian packages are fetched with `apt-get download` into `<cache_dir>/debs/` and read straight from the .deb (nothing is
installed); a .deb already in that folder is used as is, which is also how to supply one by hand.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dsunlearn.demo.lazyload import read_lazyload_db

__all__ = [
    "AUSTEN_NOVELS",
    "DEB_PACKAGES",
    "PAPER_PACKAGES",
    "FetchError",
    "book_documents",
    "code_documents",
    "deb_members",
    "devil_documents",
    "fetch_deb",
    "fetch_debs",
    "paper_documents",
    "python_version",
    "select_stdlib_files",
    "split_austen_chapters",
    "split_moby_dick_chapters",
    "split_paper_sections",
    "strip_gutenberg",
    "strip_r_chunks",
]

# R data object name -> id slug, in a fixed order (the order of the documents in the corpus).
AUSTEN_NOVELS = {
    "sensesensibility": "sense-and-sensibility",
    "prideprejudice": "pride-and-prejudice",
    "mansfieldpark": "mansfield-park",
    "emma": "emma",
    "northangerabbey": "northanger-abbey",
    "persuasion": "persuasion",
}

# Debian names (without `r-cran-`) of R packages whose vignettes are papers: most are Journal of Statistical Software
# articles, survival's are technical reports.
PAPER_PACKAGES = (
    "coin", "flexmix", "glmnet", "lme4", "lmtest", "matrix", "multcomp", "party", "partykit", "plm", "pscl",
    "sandwich", "spdep", "strucchange", "survival", "vcd", "xts", "zoo",
)

# Every Debian package the corpus reads.
DEB_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "dict-devil", *(f"r-cran-{p}" for p in PAPER_PACKAGES))

# Path components of the stdlib tree that are not library modules (tests, data tables, vendored tools, installs).
STDLIB_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "lib2to3", "encodings", "pydoc_data", "turtledemo", "site-packages",
    "dist-packages", "__pycache__",
})
STDLIB_MIN_CHARS = 500


class FetchError(RuntimeError):
    """A Debian package could not be fetched; the message says how to fetch it by hand."""


# ---------------------------------------------------------------------------------------------------------- fetching
def fetch_deb(package: str, cache_dir: str | os.PathLike) -> Path:
    """The path of `package`'s .deb under `<cache_dir>/debs/`, downloading it with `apt-get download` if absent."""
    deb_dir = Path(cache_dir) / "debs"
    deb_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    how = (
        f"Fetch it by hand on a Debian/Ubuntu machine with `apt-get update && apt-get download {package}` and put "
        f"the .deb file into {deb_dir}/ (any machine will do; the file is read, not installed), then rerun."
    )
    if shutil.which("apt-get") is None:
        raise FetchError(f"cannot fetch Debian package {package!r}: apt-get is not available here. {how}")
    proc = subprocess.run(["apt-get", "download", package], cwd=deb_dir, capture_output=True, text=True)
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        detail = err[-1] if err else f"exit status {proc.returncode}"
        hint = " (the package lists may be missing: run `apt-get update` as root first)" if "Unable to locate" in (
            proc.stderr or "") else ""
        raise FetchError(f"cannot fetch Debian package {package!r}: `apt-get download` failed: {detail}{hint}. {how}")
    return found[-1]


def fetch_debs(packages: Iterable[str], cache_dir: str | os.PathLike) -> dict[str, Path]:
    """`fetch_deb` for several packages, downloading all missing ones with a single `apt-get download` (faster)."""
    packages = list(packages)
    deb_dir = Path(cache_dir) / "debs"
    deb_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not any(deb_dir.glob(f"{p}_*.deb"))]
    if len(missing) > 1 and shutil.which("apt-get"):
        # On failure, fetch_deb below retries one by one and names the package at fault.
        subprocess.run(["apt-get", "download", *missing], cwd=deb_dir, capture_output=True)
    return {p: fetch_deb(p, cache_dir) for p in packages}


def _deb_data_tar(deb: Path) -> bytes:
    """The uncompressed data.tar of a .deb (via dpkg-deb when present, else parsing the ar archive here)."""
    if shutil.which("dpkg-deb"):
        return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58])
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                return lzma.decompress(body)
            if name.endswith(".gz"):
                return gzip.decompress(body)
            if name == "data.tar":
                return body
            raise FetchError(f"{deb}: {name} needs dpkg-deb to unpack (install dpkg, or use a Debian machine)")
    raise ValueError(f"{deb} has no data.tar member")


def deb_members(deb: str | os.PathLike, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of a .deb whose path (without the leading './') satisfies `want`, sorted by path."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(Path(deb)))) as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and want(path):
                out[path] = tar.extractfile(member).read()
    return dict(sorted(out.items()))


def _r_data(deb: Path, pkg: str) -> dict:
    stem = f"usr/lib/R/site-library/{pkg}/data/Rdata"
    files = deb_members(deb, lambda p: p in (stem + ".rdx", stem + ".rdb"))
    if len(files) != 2:
        raise ValueError(f"{deb} has no R lazy-load data at {stem}.rdx/.rdb")
    return read_lazyload_db(files[stem + ".rdx"], files[stem + ".rdb"])


# ------------------------------------------------------------------------------------------------------------- books
_AUSTEN_CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) +(?:[IVXLC]+|\d+)\.?\s*$")
_AUSTEN_END = re.compile(r"^\s*(?:THE END|FINIS|Finis)\s*$")


def split_austen_chapters(lines: Iterable[str]) -> list[str]:
    """Chapters of a janeaustenr novel (a vector of lines); front matter, volume headings and 'THE END' dropped.

    Chapter numbers restart in each volume of some novels (Emma), so chapters are returned in reading order and
    named by position, not by their printed number.
    """
    chapters: list[list[str]] = []
    for line in lines:
        if _AUSTEN_CHAPTER.match(line):
            chapters.append([line.strip()])
        elif chapters and not re.match(r"^\s*VOLUME [IVX]+\s*$", line) and not _AUSTEN_END.match(line):
            chapters[-1].append(line)
    return [_tidy("\n".join(c)) for c in chapters]


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg e-text: what lies between the `*** START OF` and `*** END OF` lines."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    start = re.search(r"^\*\*\* ?START OF[^\n]*\n", text, re.M)
    end = re.search(r"^\*\*\* ?END OF", text, re.M)
    if start is None or end is None or end.start() < start.end():
        raise ValueError("no '*** START OF' ... '*** END OF' Project Gutenberg markers found")
    return text[start.end() : end.start()].strip("\n") + "\n"


def split_moby_dick_chapters(body: str) -> list[tuple[str, str]]:
    """(slug, text) per chapter of Moby Dick, `ch001` ... `ch135` and `epilogue`; front matter before chapter 1 dropped."""
    heads = list(re.finditer(r"^(?:CHAPTER (\d+)\.[^\n]*|Epilogue)\s*$", body, re.M))
    out = []
    for i, m in enumerate(heads):
        stop = heads[i + 1].start() if i + 1 < len(heads) else len(body)
        slug = f"ch{int(m.group(1)):03d}" if m.group(1) else "epilogue"
        out.append((slug, _tidy(body[m.start() : stop])))
    return out


def book_documents(cache_dir: str | os.PathLike) -> list[dict]:
    """Chapter documents of Austen's six novels and of Moby Dick."""
    docs = []
    deb = fetch_deb("r-cran-janeaustenr", cache_dir)
    novels = _r_data(deb, "janeaustenr")
    for name, slug in AUSTEN_NOVELS.items():
        for i, text in enumerate(split_austen_chapters(novels[name]), 1):
            docs.append(_doc(f"books/austen/{slug}/ch{i:02d}", "books", "r-cran-janeaustenr", text))
    deb = fetch_deb("r-cran-tokenizers", cache_dir)
    moby = _r_data(deb, "tokenizers")["mobydick"][0]
    for slug, text in split_moby_dick_chapters(strip_gutenberg(moby)):
        docs.append(_doc(f"books/melville/moby-dick/{slug}", "books", "r-cran-tokenizers", text))
    return docs


def _dictd_number(s: str) -> int:
    # dictd index numbers are base64 digits, most significant first (dictd's b64_decode).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for ch in s:
        n = n * 64 + alphabet.index(ch)
    return n


def devil_documents(cache_dir: str | os.PathLike) -> list[dict]:
    """Bierce's Devil's Dictionary (1911, public domain), one document per initial letter of the headwords."""
    deb = fetch_deb("dict-devil", cache_dir)
    files = deb_members(deb, lambda p: p in ("usr/share/dictd/devil.dict.dz", "usr/share/dictd/devil.index"))
    data = gzip.decompress(files["usr/share/dictd/devil.dict.dz"])  # dictzip is gzip with a random-access index
    entries = []
    for line in files["usr/share/dictd/devil.index"].decode("utf-8").splitlines():
        head, off, length = line.split("\t")[:3]
        if head.startswith("00database") or head.startswith("00-database"):
            continue
        start = _dictd_number(off)
        entries.append((start, data[start : start + _dictd_number(length)].decode("utf-8", errors="replace")))
    by_letter: dict[str, list[str]] = {}
    for _, text in sorted(entries):
        text = _tidy(text)
        letter = text.lstrip()[:1].lower()
        by_letter.setdefault(letter if letter.isalpha() else "other", []).append(text)
    return [
        _doc(f"books/bierce/devils-dictionary/{letter}", "books", "dict-devil", "\n".join(texts))
        for letter, texts in sorted(by_letter.items())
    ]


# ------------------------------------------------------------------------------------------------------------ papers
_SWEAVE_CHUNK = re.compile(r"^<<[^\n]*>>=[^\n]*\n.*?(?:^@[^\n]*(?:\n|\Z)|\Z)", re.M | re.S)
_RMD_CHUNK = re.compile(r"^[ \t]*(`{3,})[ \t]*\{[^\n]*\}[^\n]*\n.*?(?:^[ \t]*\1[ \t]*(?:\n|\Z)|\Z)", re.M | re.S)


def strip_r_chunks(text: str, kind: str) -> str:
    """The prose of a vignette: R code chunks (Sweave `<<>>= ... @` in .Rnw, ```` ```{r} ```` in .Rmd) removed,
    plus the LaTeX preamble (.Rnw) or YAML header (.Rmd) and full-line LaTeX comments."""
    text = text.replace("\r\n", "\n")
    if kind == "Rnw":
        begin, end = text.find("\\begin{document}"), text.find("\\end{document}")
        if begin >= 0:
            text = text[begin + len("\\begin{document}") :]
            end = text.find("\\end{document}")
        if end >= 0:
            text = text[:end]
        text = _SWEAVE_CHUNK.sub("", text)
        text = re.sub(r"^@[^\n]*\n?", "", text, flags=re.M)  # a bare `@` also opens a text chunk
        text = re.sub(r"^[ \t]*%[^\n]*\n?", "", text, flags=re.M)
        text = re.sub(r"^[ \t]*\\SweaveOpts\{[^\n]*\n?", "", text, flags=re.M)
    elif kind == "Rmd":
        text = re.sub(r"\A---\n.*?\n---[ \t]*\n", "", text, flags=re.S)
        text = _RMD_CHUNK.sub("", text)
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    else:
        raise ValueError(f"unknown vignette kind {kind!r}; expected 'Rnw' or 'Rmd'")
    return _tidy(text)


def split_paper_sections(prose: str, kind: str) -> list[str]:
    """Top-level sections of a vignette's prose (`\\section` in LaTeX; the highest Markdown heading level used).

    Text before the first heading (abstract, introduction without a heading) is the first section.
    """
    if kind == "Rnw":
        pattern = re.compile(r"^[ \t]*\\section\*?[\[{]", re.M)
    else:
        levels = [len(m.group(1)) for m in re.finditer(r"^(#{1,6})[ \t]+\S", prose, re.M)]
        pattern = re.compile(rf"^#{{{min(levels)}}}[ \t]+\S", re.M) if levels else None
    starts = [0] + ([m.start() for m in pattern.finditer(prose)] if pattern else [])
    bounds = sorted(set(starts)) + [len(prose)]
    parts = [_tidy(prose[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [p for p in parts if p.strip()]


def paper_documents(cache_dir: str | os.PathLike, packages: Iterable[str] = PAPER_PACKAGES) -> list[dict]:
    """Section documents of the vignettes (`site-library/<pkg>/doc/*.Rnw|*.Rmd`) of R packages."""
    docs = []
    for pkg in packages:
        source = f"r-cran-{pkg}"
        deb = fetch_deb(source, cache_dir)
        # The R package directory may differ from the Debian name in case (r-cran-matrix installs Matrix/), and R's
        # recommended packages (survival, Matrix) install into library/ rather than site-library/.
        vignette = re.compile(r"usr/lib/R/(?:site-)?library/([^/]+)/doc/([^/]+)\.(Rnw|Rmd)")
        for path, raw in deb_members(deb, vignette.fullmatch).items():
            r_pkg, stem, kind = vignette.fullmatch(path).groups()
            prose = strip_r_chunks(raw.decode("utf-8", errors="replace"), kind)
            for i, text in enumerate(split_paper_sections(prose, kind)):
                docs.append(_doc(f"papers/{r_pkg}/{stem}/sec{i:02d}", "papers", source, text))
    return docs


# -------------------------------------------------------------------------------------------------------------- code
def select_stdlib_files(stdlib_dir: str | os.PathLike, min_chars: int = STDLIB_MIN_CHARS) -> Iterator[tuple[str, str]]:
    """(relative posix path, text) of the stdlib modules that make documents, sorted by path.

    Skipped: anything under a directory in `STDLIB_SKIP_DIRS` (tests, encodings/, pydoc_data/, lib2to3/, idlelib/,
    installed site-packages ...), `test_*.py` files, files that are not UTF-8, and files under `min_chars` characters.
    """
    root = Path(stdlib_dir)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow symlinked directories
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                paths.append((rel_dir / name).as_posix())
    for rel in sorted(paths):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= min_chars:
            yield rel, text


def code_documents(stdlib_dir: str | os.PathLike | None = None) -> list[dict]:
    """One document per module file of the CPython standard library (of the running interpreter by default)."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    return [_doc(f"code/cpython/{rel}", "code", "cpython", text) for rel, text in select_stdlib_files(stdlib_dir)]


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


# ----------------------------------------------------------------------------------------------------------- helpers
def _tidy(text: str) -> str:
    """Trailing spaces removed, runs of 3+ blank lines collapsed, one final newline."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def _doc(doc_id: str, domain: str, source: str, text: str) -> dict:
    return {"id": doc_id, "domain": domain, "source": source, "text": text}
