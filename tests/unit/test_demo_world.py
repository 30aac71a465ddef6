"""The demo-world builder: extraction rules, the R data reader, the split, the manifest, the tokenizer.

All tests but the last run on synthetic inputs (no apt, no network); the last, marked slow, builds the real corpus.
"""
from __future__ import annotations

import gzip
import io
import json
import lzma
import random
import shutil
import struct
import subprocess
import tarfile
import zlib

import pytest

from dsunlearn.demo import sources, world
from dsunlearn.demo.lazyload import read_lazyload_db, unserialize


# ------------------------------------------------------------------------------------------------------- extraction
def test_strip_gutenberg_keeps_only_the_body():
    text = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\nlicence blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nCHAPTER 1. Start.\r\n\r\nCall me.\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n")
    assert sources.strip_gutenberg(text) == "CHAPTER 1. Start.\n\nCall me.\n"
    with pytest.raises(ValueError, match="START OF"):
        sources.strip_gutenberg("no markers here")


def test_moby_dick_and_austen_chapters():
    body = "Front matter.\n\nCHAPTER 1. Loomings.\n\nCall me Ishmael.\n\nCHAPTER 2. Bag.\n\nI stuffed.\n\nEpilogue\n\nEnd."
    assert [s for s, _ in sources.split_moby_dick_chapters(body)] == ["ch001", "ch002", "epilogue"]
    assert sources.split_moby_dick_chapters(body)[0][1] == "CHAPTER 1. Loomings.\n\nCall me Ishmael.\n"
    lines = ["EMMA", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse.", "", "VOLUME II", "CHAPTER I", "Again.",
             "", "THE END"]
    assert sources.split_austen_chapters(lines) == ["CHAPTER I\n\nEmma Woodhouse.\n", "CHAPTER I\nAgain.\n"]


def test_strip_r_chunks_rnw():
    rnw = ("\\documentclass{jss}\n\\title{T}\n\\begin{document}\n%\\VignetteIndexEntry{x}\n"
           "\\section{Intro}\nSome prose.\n<<setup, echo=FALSE>>=\nlibrary(\"zoo\")\nx <- 1\n@\n"
           "More prose with \\code{x}.\n<<fit>>=\nfit <- lm(y ~ x)\n@ %def\n@\nText after a bare at.\n"
           "\\end{document}\ntrailing\n")
    out = sources.strip_r_chunks(rnw, "Rnw")
    assert out == "\\section{Intro}\nSome prose.\nMore prose with \\code{x}.\nText after a bare at.\n"
    assert sources.split_paper_sections("Abstract.\n\\section{A}\na\n\\section*{B}\nb\n", "Rnw") == [
        "Abstract.\n", "\\section{A}\na\n", "\\section*{B}\nb\n"]


def test_strip_r_chunks_rmd():
    rmd = ("---\ntitle: \"T\"\nvignette: >\n  %\\VignetteIndexEntry{x}\n---\n\n## Intro\n\nProse `r 1+1`.\n\n"
           "```{r, eval=FALSE}\n# not a heading\nfit <- glmnet(x, y)\n```\n\n## Next\n\nMore.\n<!-- hidden -->\n")
    out = sources.strip_r_chunks(rmd, "Rmd")
    assert "glmnet(x" not in out and "not a heading" not in out and "title:" not in out and "hidden" not in out
    assert sources.split_paper_sections(out, "Rmd") == ["## Intro\n\nProse `r 1+1`.\n", "## Next\n\nMore.\n"]
    with pytest.raises(ValueError, match="kind"):
        sources.strip_r_chunks("x", "Rtex")


def test_stdlib_selection_rules(tmp_path):
    files = {
        "json/decoder.py": "x = 1\n" * 100,
        "short.py": "x = 1\n",
        "test/test_json.py": "x = 1\n" * 100,
        "unittest/test/test_case.py": "x = 1\n" * 100,
        "encodings/utf_8.py": "x = 1\n" * 100,
        "pydoc_data/topics.py": "x = 1\n" * 100,
        "lib2to3/main.py": "x = 1\n" * 100,
        "idlelib/editor.py": "x = 1\n" * 100,
        "site-packages/pkg/mod.py": "x = 1\n" * 100,
        "test_helper.py": "x = 1\n" * 100,
        "notes.txt": "x = 1\n" * 100,
        "abc.py": "y = 2\n" * 100,
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin.py").write_bytes(b"s = '\xe9'\n" * 100)  # not UTF-8: skipped
    assert [rel for rel, _ in sources.select_stdlib_files(tmp_path)] == ["abc.py", "json/decoder.py"]
    docs = sources.code_documents(tmp_path)
    assert [d["id"] for d in docs] == ["code/cpython/abc.py", "code/cpython/json/decoder.py"]
    assert {d["domain"] for d in docs} == {"code"} and docs[0]["text"] == files["abc.py"]


def test_dictd_number():
    assert sources._dictd_number("A") == 0 and sources._dictd_number("b") == 27
    assert sources._dictd_number("BA") == 64 and sources._dictd_number("rx") == 43 * 64 + 49


# ---------------------------------------------------------------------------------------------------- R and .deb
def _xdr_header() -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"


def _charsxp(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">ii", 9 | (1 << 3 << 12), len(b)) + b


def _strsxp(items) -> bytes:
    return struct.pack(">ii", 16, len(items)) + b"".join(_charsxp(s) for s in items)


def _intsxp(items) -> bytes:
    return struct.pack(">ii", 13, len(items)) + struct.pack(f">{len(items)}i", *items)


def _named_list(items: dict) -> bytes:
    body = struct.pack(">ii", 19 | (1 << 9), len(items)) + b"".join(items.values())
    names_attr = (struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _charsxp("names")
                  + _strsxp(list(items)) + struct.pack(">i", 254))
    return body + names_attr


@pytest.mark.parametrize("compression", [1, 3])
def test_lazyload_db_framing_around_rdata(compression):
    """The lazy-load framing (index, offsets, length prefix, compression marker) around R objects that the rdata
    package parses; NA strings come back as None."""
    emma = _xdr_header() + _strsxp(["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich"])
    moby = _xdr_header() + _strsxp(["Call me Ishmael."])
    blobs, variables, offset = b"", {}, 0
    for name, obj in [("emma", emma), ("moby", moby)]:
        body = zlib.compress(obj) if compression == 1 else b"X" + lzma.compress(obj)
        blob = struct.pack(">I", len(obj)) + body
        variables[name] = _intsxp([offset, len(blob)])
        blobs += blob
        offset += len(blob)
    flag = struct.pack(">ii", 10, 1) + struct.pack(">i", 1) if compression == 1 else _intsxp([compression])
    index = _xdr_header() + _named_list({"variables": _named_list(variables), "references": _named_list({}),
                                         "compressed": flag})
    db = read_lazyload_db(gzip.compress(index), blobs)
    assert db == {"emma": ["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich"],
                  "moby": ["Call me Ishmael."]}
    with pytest.raises(ValueError, match="expected"):  # a truncated length prefix is caught, not parsed on
        read_lazyload_db(gzip.compress(index), struct.pack(">I", 1) + blobs[4:])


def _fake_deb(path, files: dict[str, bytes]) -> None:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", lzma.compress(tar_buf.getvalue()))]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) & 1)
    path.write_bytes(out)


def test_deb_members_without_dpkg(tmp_path, monkeypatch):
    deb = tmp_path / "debs" / "r-cran-fake_1.0-1_all.deb"
    deb.parent.mkdir()
    _fake_deb(deb, {"usr/lib/R/site-library/fake/doc/a.Rnw": b"odd", "usr/share/doc/x": b"even!"})
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)  # the pure-Python ar/tar path
    got = sources.deb_members(deb, lambda p: p.endswith(".Rnw"))
    assert got == {"usr/lib/R/site-library/fake/doc/a.Rnw": b"odd"}
    if shutil.which("dpkg-deb"):
        monkeypatch.undo()
        assert sources.deb_members(deb, lambda p: p.endswith(".Rnw")) == got
    assert sources.fetch_deb("r-cran-fake", tmp_path) == deb  # a .deb already in the cache is used as is


def test_fetch_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(sources.FetchError, match=r"'r-cran-janeaustenr'.*apt-get download r-cran-janeaustenr"):
        sources.fetch_deb("r-cran-janeaustenr", tmp_path)

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package r-cran-nope")
    monkeypatch.setattr(sources.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sources.subprocess, "run", failing_run)
    with pytest.raises(sources.FetchError, match=r"'r-cran-nope'.*apt-get update"):
        sources.fetch_deb("r-cran-nope", tmp_path)


# ------------------------------------------------------------------------------------------------------------ split
def _synthetic_docs(with_general: bool = True) -> list[dict]:
    rng = random.Random(123)
    docs = []
    for domain, n in (("books", 60), ("papers", 45), ("code", 70)):
        for i in range(n):
            length = rng.choice([400, 1500, 2500, 6000])  # some too short, some to be truncated
            words = " ".join(f"{domain}{i}w{j}" for j in range(length // 8))
            text = "\n".join(words[k : k + 70] for k in range(0, len(words), 70)) + "\n"
            docs.append({"id": f"{domain}/doc{i:03d}", "domain": domain, "source": f"src-{domain}", "text": text})
    if with_general:
        docs += [{"id": f"books/devil/{c}", "domain": "books", "source": "dict-devil", "text": f"{c.upper()}, n. x\n" * 200}
                 for c in "abcdefghij"]
    return docs


SPLIT_KW = dict(num_forget_per_domain=5, retain_chars_per_domain=20_000, general_chars=8_000, max_chars=3_000,
                min_chars=1_000)


def test_split_is_deterministic_and_stratified():
    docs = _synthetic_docs()
    a = world.split_world(docs, 7, **SPLIT_KW)
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    assert a == world.split_world(shuffled, 7, **SPLIT_KW)  # input order does not matter
    assert a != world.split_world(docs, 8, **SPLIT_KW)
    ids = {name: [d["id"] for d in s] for name, s in a.items()}
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids))  # the four sets are disjoint
    for name in ("forget", "approximate"):
        assert sorted(d["domain"] for d in a[name]) == sorted(["books", "code", "papers"] * 5)
    for dom in ("books", "code", "papers"):
        chars = sum(len(d["text"]) for d in a["retain"] if d["domain"] == dom)
        assert 20_000 <= chars < 20_000 + 3_000
    assert {d["source"] for d in a["general"]} == {"dict-devil"}
    assert all(d["source"] != "dict-devil" for name in ("forget", "retain", "approximate") for d in a[name])
    assert 8_000 <= sum(len(d["text"]) for d in a["general"]) < 8_000 + 3_000
    assert all(1_000 <= len(d["text"]) <= 3_000 for s in a.values() for d in s)
    assert all(list(d) == ["id", "domain", "source", "text"] for s in a.values() for d in s)
    assert all(ids[n] == sorted(ids[n]) for n in ids)


def test_forget_and_approximate_come_from_one_pool():
    docs = _synthetic_docs()
    forget, approx = set(), set()
    for seed in range(12):
        s = world.split_world(docs, seed, **SPLIT_KW)
        forget |= {d["id"] for d in s["forget"]}
        approx |= {d["id"] for d in s["approximate"]}
    assert len(forget & approx) > 20  # the same documents serve as forget under one seed, approximate under another


def test_general_falls_back_to_leftovers_of_every_domain():
    s = world.split_world(_synthetic_docs(with_general=False), 0, **SPLIT_KW)
    assert {d["domain"] for d in s["general"]} == {"books", "code", "papers"}
    used = {d["id"] for name in ("forget", "retain", "approximate") for d in s[name]}
    assert not used & {d["id"] for d in s["general"]}


def test_split_rejects_too_small_pools():
    with pytest.raises(ValueError, match=r"domain '\w+' has \d+ usable documents.*fewer than"):
        world.split_world(_synthetic_docs(), 0, **(SPLIT_KW | {"num_forget_per_domain": 30}))


def test_truncate_cuts_at_a_line_break():
    assert world.truncate("abc\ndef\nghi\n", 9) == "abc\ndef\n"
    assert world.truncate("short", 9) == "short"
    assert world.truncate("x" * 20, 9) == "x" * 9


# ------------------------------------------------------------------------------------------- manifest and tokenizer
def test_manifest_counts_and_byte_identical_files(tmp_path):
    sets = world.split_world(_synthetic_docs(), 3, **SPLIT_KW)
    m1 = world.write_world(sets, tmp_path / "a", seed=3, params=SPLIT_KW)
    world.write_world(world.split_world(_synthetic_docs(), 3, **SPLIT_KW), tmp_path / "b", seed=3, params=SPLIT_KW)
    for name in ("forget.jsonl", "retain.jsonl", "approximate.jsonl", "general.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    for name, docs in sets.items():
        entry = m1["sets"][name]
        assert entry["num_documents"] == len(docs) == len(world.read_jsonl(tmp_path / "a" / entry["file"]))
        assert entry["num_chars"] == sum(len(d["text"]) for d in docs)
        assert sum(e["num_documents"] for e in entry["domains"].values()) == len(docs)
        assert entry["sha256"] == world._sha256(tmp_path / "a" / entry["file"])
    assert m1["sets"]["forget"]["domains"]["code"]["num_documents"] == 5
    assert world.read_jsonl(tmp_path / "a" / "forget.jsonl") == sets["forget"]


def test_tokenizer_round_trip_and_determinism(tmp_path):
    from transformers import AutoTokenizer

    texts = [d["text"] for d in _synthetic_docs()[:40]] + ["def f(x):\n    return x ** 2  # café, 漢字\n"] * 5
    world.train_tokenizer(texts, 400, tmp_path / "a")
    world.train_tokenizer(texts, 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok) == 400
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for s in ["def f(x):\n    return x ** 2  # café, 漢字\n", "unseen 🙂 bytes\t\r\n", "books3w7 papers1w2"]:
        ids = tok(s)["input_ids"]
        assert tok.decode(ids) == s and 0 not in ids and 1 not in ids
    m = world.write_world({"forget": [{"id": "a", "domain": "code", "source": "s", "text": "abc def"}]}, tmp_path / "w",
                          seed=0, tokenizer=tok, tokenizer_dir=tmp_path / "a")
    assert m["sets"]["forget"]["num_tokens"] == len(tok("abc def")["input_ids"])
    assert m["tokenizer"]["vocab_size"] == 400 and "tokenizer.json" in m["tokenizer"]["sha256"]


# ---------------------------------------------------------------------------------------------------- the real build
@pytest.mark.slow
def test_real_build(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get not available: the demo corpus is fetched from Debian packages")
    if subprocess.run(["apt-cache", "show", "r-cran-janeaustenr"], capture_output=True).returncode != 0:
        pytest.skip("apt package lists lack r-cran-janeaustenr: run `apt-get update` as root first")
    try:
        docs = world.build_corpus(tmp_path / "cache")
    except sources.FetchError as e:
        pytest.skip(f"cannot fetch the demo sources here: {e}")
    counts = {dom: sum(d["domain"] == dom for d in docs) for dom in ("books", "papers", "code")}
    assert counts["books"] > 400 and counts["papers"] > 250 and counts["code"] > 200, counts
    assert world.build_corpus(tmp_path / "cache") == docs  # from the cache
    m = world.build_world(tmp_path / "cache", tmp_path / "a", seed=0)
    world.build_world(tmp_path / "cache", tmp_path / "b", seed=0)
    for p in sorted((tmp_path / "a").rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p
    sets = m["sets"]
    assert all(sets["forget"]["domains"][d]["num_documents"] == 16 for d in counts)
    assert 35_000 < sets["forget"]["num_tokens"] < 60_000
    assert 35_000 < sets["approximate"]["num_tokens"] < 60_000
    assert 300_000 < sets["retain"]["num_tokens"] < 500_000
    assert 10_000 < sets["general"]["num_tokens"] < 40_000
