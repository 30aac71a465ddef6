"""The data pipeline: every input format, chunking and padding, the stream sampler; `data split` and `data check`."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.config import ConfigError
from dsunlearn.data import StreamSampler, chunk_token_ids, collate, load_documents, tokenize_and_chunk
from dsunlearn.methods.terms import IGNORE_INDEX
from dsunlearn.split import SplitSettings, split_corpus, split_indices
from dsunlearn.toy import generate_documents
from helpers import write_run_config

TEXTS = ["the first document. w1 w2 w3.", "a second one, a little longer than the first document.", "third"]


@pytest.fixture(scope="module")
def tok(toy_world):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(toy_world["model"])


def _docs(texts):
    import datasets
    return datasets.Dataset.from_dict({"text": list(texts)})


# ---------------------------------------------------------------------------------------------------------- chunking

def test_chunk_token_ids_exact_boundaries():
    assert chunk_token_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_token_ids(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_token_ids([], 4) == []


def test_tokenize_and_chunk_boundaries_eos_and_no_packing(tok):
    texts = generate_documents(3, seed=1, words_per_doc=30)
    seq_len = 16
    chunks, stats = tokenize_and_chunk(_docs(texts), tok, seq_len, min_chunk_tokens=1)
    expected = []
    for d, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected += [(d, j, ids[i:i + seq_len]) for j, i in enumerate(range(0, len(ids), seq_len))]
    got = list(zip(chunks["doc_index"], chunks["chunk_index"], chunks["input_ids"]))
    assert got == expected  # consecutive pieces of one document each: never two documents in one chunk
    assert all(1 <= len(c) <= seq_len for c in chunks["input_ids"])
    last = {d: c for d, _, c in got}  # the last chunk of every document ends with EOS
    assert all(c[-1] == tok.eos_token_id for c in last.values())
    assert stats.num_documents == 3 and stats.num_chunks == len(expected) and stats.num_dropped_chunks == 0
    assert stats.num_tokens == sum(len(c) for _, _, c in expected) == sum(chunks["num_tokens"])

    plain, _ = tokenize_and_chunk(_docs(texts[:1]), tok, 10_000, min_chunk_tokens=1, add_eos=False)
    assert plain["input_ids"][0] == tok(texts[0], add_special_tokens=False)["input_ids"]


def test_short_chunks_are_dropped_and_counted(tok):
    texts = generate_documents(4, seed=2, words_per_doc=25)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    seq_len, min_tokens = 16, 8
    tails = [n % seq_len for n in lengths]
    short = [t for t in tails if 0 < t < min_tokens]
    chunks, stats = tokenize_and_chunk(_docs(texts), tok, seq_len, min_chunk_tokens=min_tokens)
    assert stats.num_dropped_chunks == len(short) and stats.num_dropped_tokens == sum(short)
    assert stats.num_tokens + stats.num_dropped_tokens == sum(lengths)
    assert short and min(chunks["num_tokens"]) >= min_tokens  # the case under test occurs (4 short tails)
    with pytest.raises(ConfigError, match="zero usable chunks"):
        tokenize_and_chunk(_docs(["w1"]), tok, seq_len, min_chunk_tokens=min_tokens, source="tiny")


def test_collate_pads_and_masks():
    batch = collate([[5, 6, 7], [1, 2, 3, 4, 5]], seq_len=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[5, 6, 7, x, x, x], [1, 2, 3, 4, 5, x]]
    assert batch["input_ids"].dtype == torch.long


# ------------------------------------------------------------------------------------------------------ input formats

def _write_formats(root):
    """The same three documents in every supported format; returns {format: path}."""
    import datasets
    rows = [{"id": f"d{i}", "text": t, "n": i} for i, t in enumerate(TEXTS)]
    paths = {"jsonl": root / "c.jsonl", "json": root / "c.json", "parquet": root / "c.parquet",
             "folder": root / "txt", "saved": root / "saved", "field": root / "body.jsonl"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(paths["parquet"]))
    paths["folder"].mkdir()
    for i, t in enumerate(TEXTS):
        (paths["folder"] / f"d{i}.txt").write_text(t)
    (paths["folder"] / "ignored.bin").write_bytes(b"\xff")
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    # A custom text field next to an unrelated "text" column: the chosen field is the text.
    paths["field"].write_text("".join(json.dumps({"id": r["id"], "body": r["text"], "text": "other"}) + "\n"
                                      for r in rows))
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "folder", "saved", "field"])
def test_every_input_format_loads(tmp_path, fmt):
    path = _write_formats(tmp_path)[fmt]
    ds = load_documents(str(path), text_field="body" if fmt == "field" else "text")
    assert ds["text"] == TEXTS
    assert ds["id"] == ([f"d{i}.txt" for i in range(3)] if fmt == "folder" else ["d0", "d1", "d2"])


def test_unknown_format_and_missing_custom_field(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unknown data format"):
        load_documents(str(tmp_path / "x.csv"))
    path = _write_formats(tmp_path)["parquet"]
    with pytest.raises(ConfigError, match="missing text field 'body'"):
        load_documents(str(path), text_field="body")


# ------------------------------------------------------------------------------------------------------- the sampler

def _global_batch(num_chunks, world_size, per_rank, grad_accum, step, seed=3):
    """Every chunk of one optimizer step, in (micro-step, rank) order."""
    sampler = StreamSampler(num_chunks, per_rank, grad_accum, world_size, seed)
    return [i for micro in range(grad_accum) for rank in range(world_size) for i in sampler.indices(step, micro, rank)]


@pytest.mark.parametrize("step", [0, 1, 7, 12])
def test_global_batch_is_the_same_for_every_world_size(step):
    # global batch 8 = per_rank x grad_accum x world_size in each layout
    layouts = [(1, 8, 1), (1, 4, 2), (2, 4, 1), (2, 2, 2), (4, 2, 1), (4, 1, 2)]
    batches = [_global_batch(37, w, p, g, step) for w, p, g in layouts]
    assert all(b == batches[0] for b in batches) and len(batches[0]) == 8


def test_every_chunk_once_per_epoch_and_a_pure_function_of_step():
    n, per_rank, world = 37, 3, 2
    s = StreamSampler(n, per_rank, 1, world, seed=5)
    stream = [i for step in range(40) for rank in range(world) for i in s.indices(step, 0, rank)]
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # a fresh permutation each epoch
    # Asking again, in another order, from another instance: the same answer (resume needs only the step number).
    again = StreamSampler(n, per_rank, 1, world, seed=5)
    assert [again.indices(step, 0, 1) for step in reversed(range(40))] == \
           [s.indices(step, 0, 1) for step in reversed(range(40))]
    other = StreamSampler(n, per_rank, 1, world, seed=6)
    assert [other.indices(k, 0, 0) for k in range(5)] != [s.indices(k, 0, 0) for k in range(5)]


# ------------------------------------------------------------------------------------------------------- data split

def _corpus(path, n=40, reverse=False):
    """n documents with ids, a date (half after 2024-06-30, one exactly on it) and an extra field; shuffled order."""
    texts = generate_documents(n, seed=11, words_per_doc=30)
    rows = [{"id": f"doc{i:03d}", "text": t, "date": f"2024-{1 + (i % 12):02d}-{1 + (i % 28):02d}",
             "meta": {"i": i}} for i, t in enumerate(texts)]
    rows[0]["date"] = "2024-06-30T23:59:00+02:00"
    random.Random(0).shuffle(rows)
    if reverse:
        rows.reverse()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _split(tmp_path, name, *args):
    code = main(["data", "split", "--out", str(tmp_path / name), *args])
    return code, tmp_path / name


def test_random_split_deterministic_order_free_and_counted(tmp_path, toy_world, capsys):
    rows = _corpus(tmp_path / "c.jsonl")
    _corpus(tmp_path / "r.jsonl", reverse=True)
    args = ["--random", "--seed", "3", "--num-forget", "6", "--num-approximate", "5"]
    code, a = _split(tmp_path, "a", "--input", str(tmp_path / "c.jsonl"), *args,
                     "--tokenizer", toy_world["model"], "--seq-len", "32", "--min-chunk-tokens", "4")
    assert code == 0, capsys.readouterr().err
    _, b = _split(tmp_path, "b", "--input", str(tmp_path / "c.jsonl"), *args,
                  "--tokenizer", toy_world["model"], "--seq-len", "32", "--min-chunk-tokens", "4")
    for f in ("forget.jsonl", "retain.jsonl", "approximate.jsonl", "manifest.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    _, r = _split(tmp_path, "r", "--input", str(tmp_path / "r.jsonl"), *args)
    for f in ("forget.jsonl", "retain.jsonl", "approximate.jsonl"):
        assert (a / f).read_bytes() == (r / f).read_bytes(), f"input order changed {f}"
    _, other = _split(tmp_path, "s", "--input", str(tmp_path / "c.jsonl"), *args[:1], "--seed", "4", *args[3:])
    assert (a / "forget.jsonl").read_bytes() != (other / "forget.jsonl").read_bytes()

    m = json.loads((a / "manifest.json").read_text())
    sets = {n: _read(a / f"{n}.jsonl") for n in ("forget", "retain", "approximate")}
    assert [m["sets"][n]["num_documents"] for n in sets] == [6, 40 - 11, 5]
    by_id = {r["id"]: r for r in rows}
    ids = [r["id"] for s in sets.values() for r in s]
    assert sorted(ids) == sorted(by_id) and not (a / "general.jsonl").exists()
    for n, docs in sets.items():
        assert all(d == by_id[d["id"]] for d in docs)  # every original field, values untouched
        assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
        e = m["sets"][n]
        assert e["num_chars"] == sum(len(d["text"]) for d in docs)
        assert e["sha256"] == hashlib.sha256((a / f"{n}.jsonl").read_bytes()).hexdigest()
        assert e["num_chunks"] >= len(docs) and e["num_tokens"] > e["num_chunks"]
    assert m["source"]["num_documents"] == 40 and len(m["source"]["sha256"]) == 64
    assert m["settings"]["mode"] == "random" and m["settings"]["tokenizer"]["seq_len"] == 32


def test_id_split(tmp_path):
    rows = _corpus(tmp_path / "c.jsonl")
    listed = ["doc005", "doc017", "doc030"]
    (tmp_path / "ids.txt").write_text("\n".join(listed) + "\n\n")
    general = _write_general(tmp_path)
    code, out = _split(tmp_path, "o", "--input", str(tmp_path / "c.jsonl"), "--forget-ids", str(tmp_path / "ids.txt"),
                       "--general", str(general))
    assert code == 0
    assert [d["id"] for d in _read(out / "forget.jsonl")] == listed
    approx = {d["id"] for d in _read(out / "approximate.jsonl")}
    retain = {d["id"] for d in _read(out / "retain.jsonl")}
    assert len(approx) == 3 and not approx & set(listed) and not retain & (approx | set(listed))
    assert len(retain) == len(rows) - 6
    m = json.loads((out / "manifest.json").read_text())
    assert m["sets"]["general"]["num_documents"] == 2 and m["settings"]["forget_ids"]["num_ids"] == 3
    (tmp_path / "ids.json").write_text(json.dumps(listed))
    _, again = _split(tmp_path, "j", "--input", str(tmp_path / "c.jsonl"), "--forget-ids", str(tmp_path / "ids.json"),
                      "--general", str(general))
    assert (again / "approximate.jsonl").read_bytes() == (out / "approximate.jsonl").read_bytes()


def _write_general(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_documents(2, seed=99, prefix="g")))
    return path


def test_date_split(tmp_path):
    rows = _corpus(tmp_path / "c.jsonl")
    code, out = _split(tmp_path, "o", "--input", str(tmp_path / "c.jsonl"), "--date-field", "date",
                       "--cutoff", "2024-06-30", "--forget-fraction", "0.25")
    assert code == 0
    late = {r["id"] for r in rows if r["date"][:10] > "2024-06-30"}
    approx = {d["id"] for d in _read(out / "approximate.jsonl")}
    forget = {d["id"] for d in _read(out / "forget.jsonl")}
    retain = {d["id"] for d in _read(out / "retain.jsonl")}
    assert approx == late and "doc000" not in approx  # dated on the cut-off day: seen
    assert len(forget) == round(0.25 * (40 - len(late))) and forget | retain == {r["id"] for r in rows} - late
    m = json.loads((out / "manifest.json").read_text())
    assert m["sets"]["approximate"]["num_documents"] == len(late) and m["num_unused"] == 0
    # A sample of the late documents, when asked for; the rest is counted as unused.
    _, sub = _split(tmp_path, "s", "--input", str(tmp_path / "c.jsonl"), "--date-field", "date",
                    "--cutoff", "2024-06-30", "--num-approximate", "4")
    assert json.loads((sub / "manifest.json").read_text())["num_unused"] == len(late) - 4


def test_split_indices_pure_function():
    recs = [{"id": str(i), "text": "x"} for i in range(20)]
    s = SplitSettings(mode="random", seed=1, num_forget=3)
    assert split_indices(recs, s) == split_indices(list(recs), s)
    no_ids = [{"text": f"t{i}"} for i in range(20)]  # no id field: row order, still deterministic
    got = split_indices(no_ids, s)
    assert len(got["forget"]) == 3 and len(got["approximate"]) == 3 and len(got["retain"]) == 14


@pytest.mark.parametrize("extra, fragment", [
    (["--forget-ids", "IDS"], "2 forget id(s) not in"),
    (["--forget-ids", "IDS", "--id-field", "uid"], "missing id field 'uid'"),
    (["--date-field", "published", "--cutoff", "2024-06-30"], "missing date field 'published'"),
    (["--date-field", "date", "--cutoff", "2024-06-30", "BADDATE"], "cannot parse date 'last spring'"),
    (["--date-field", "date", "--cutoff", "30/06/2024"], "--cutoff: expected YYYY-MM-DD"),
    (["--date-field", "date", "--cutoff", "2030-01-01"], "no document dated after 2030-01-01"),
    (["--random", "--num-forget", "35"], "too few for 35 forget + 35 approximate"),
    (["--random", "--text-field", "body"], "missing text field 'body'"),
])
def test_split_bad_input_exit_2(tmp_path, capsys, extra, fragment):
    rows = _corpus(tmp_path / "c.jsonl")
    (tmp_path / "ids.txt").write_text("doc001\nnope\nnope2\n")
    if "BADDATE" in extra:
        extra = extra[:-1]
        rows[3]["date"] = "last spring"
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [str(tmp_path / "ids.txt") if a == "IDS" else a for a in extra]
    code, out = _split(tmp_path, "o", "--input", str(tmp_path / "c.jsonl"), *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("dsunlearn: error: ") and fragment in err[-1], err
    assert not out.exists(), "nothing is written before the input is validated"


def test_split_refuses_to_overwrite(tmp_path, capsys):
    _corpus(tmp_path / "c.jsonl")
    args = ["--input", str(tmp_path / "c.jsonl"), "--random"]
    assert _split(tmp_path, "o", *args)[0] == 0
    assert _split(tmp_path, "o", *args, "--seed", "1")[0] == 2
    assert "already holds a split" in capsys.readouterr().err
    assert _split(tmp_path, "o", *args, "--seed", "1", "--overwrite")[0] == 0


def test_split_module_errors_are_config_errors():
    with pytest.raises(ConfigError, match="no documents"):
        split_indices([], SplitSettings(mode="random"))
    with pytest.raises(ConfigError, match="duplicate id 'a'"):
        split_indices([{"id": "a", "text": ""}, {"id": "a", "text": ""}], SplitSettings(mode="random"))


# ------------------------------------------------------------------------------------------------------- data check

def test_data_check_exit_codes(tmp_path, toy_world, capsys):
    same = write_run_config(tmp_path / "same.json", toy_world, tmp_path / "run")
    out = tmp_path / "check.json"
    # forget and approximate: one generator, different documents (membership only)
    assert main(["data", "check", "--config", str(same), "--auc-band", "0.3", "--out", str(out)]) == 0
    assert "## Approximate-set check: PASS" in capsys.readouterr().out
    assert json.loads(out.read_text())["passed"] is True

    shifted = tmp_path / "shifted.jsonl"
    shifted.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_documents(16, seed=7, prefix="z")))
    assert main(["data", "check", "--config", str(same), "--set", f"data.approximate={shifted}",
                 "--out", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["blind_auc"]["auc"] > 0.9

    assert main(["data", "check", "--config", str(same), "--set", "data.approximate=null"]) == 2
    assert "data.approximate: required" in capsys.readouterr().err
    assert np.isfinite(report["blind_auc"]["null_sd"])
