"""Batched greedy decoding and VerbMem (dsunlearn/eval/generate.py), against a plain greedy loop written here."""
import pytest
import torch

from dsunlearn.eval.generate import generated_tokens, greedy_continuations, left_padded, rouge_l_f1
from dsunlearn.eval.memorisation import chunk_verbmem_set, knowmem_set, score_set


@pytest.fixture(scope="module")
def toy_model(toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(toy_world["model"])
    model = AutoModelForCausalLM.from_pretrained(toy_world["model"]).eval()
    return model, tokenizer


@torch.no_grad()
def greedy_by_hand(model, prompt: list[int], new_tokens: int, eos_id) -> list[int]:
    """No padding, no KV cache, no ``generate``: the whole sequence forward, argmax of the last position."""
    seq = list(prompt)
    out = []
    for _ in range(new_tokens):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        if nxt == eos_id:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_left_padding_and_eos_cut():
    batch = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert generated_tokens(torch.tensor([4, 9, 1, 3]), pad_id=0, eos_id=1) == [4, 9]
    assert generated_tokens(torch.tensor([4, 9, 3]), pad_id=0, eos_id=1) == [4, 9, 3]


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words: P = 3/3, R = 3/6, F1 = 2PR/(P+R) = 2/3.
    assert rouge_l_f1(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(2 / 3)]
    assert rouge_l_f1(["a b c"], ["a b c"]) == [pytest.approx(1.0)]
    assert rouge_l_f1(["x y"], ["a b"]) == [0.0]


def test_batched_left_padded_decoding_is_the_plain_greedy_loop(toy_model, toy_world):
    model, tokenizer = toy_model
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (6, 11, 3, 8, 14, 5, 9)]
    batched = greedy_continuations(model, prompts, 12, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size=3)
    assert batched == [greedy_by_hand(model, p, 12, tokenizer.eos_token_id) for p in prompts]
    assert any(len(b) == 12 for b in batched)


def test_verbmem_is_one_on_the_models_own_continuation_and_rouge_otherwise(toy_model, toy_world):
    model, tokenizer = toy_model
    prefix, new = 8, 10
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, model.config.vocab_size, (prefix,), generator=g).tolist() for _ in range(8)]
    own = [p + greedy_by_hand(model, p, new, tokenizer.eos_token_id) for p in prompts]
    # ROUGE scores words: keep the continuations that decode to at least one (the tiny model also emits symbols).
    own = [o for o in own if any(c.isalnum() for c in decode(o[prefix:]))]
    assert len(own) >= 2
    scored = score_set(model, chunk_verbmem_set("forget", own, tokenizer, prefix, new), tokenizer)
    assert scored["num_prompts"] == len(own) and scored["score"] == pytest.approx(1.0)
    # Other continuations (the toy world's text after the same prompts): the ROUGE-L F1 computed here.
    import json
    lines = [json.loads(line)["text"] for line in open(toy_world["forget"])][:len(own)]
    truth = [o[:prefix] + tokenizer(t)["input_ids"][:new] for o, t in zip(own, lines)]
    scored = score_set(model, chunk_verbmem_set("forget", truth, tokenizer, prefix, new), tokenizer)
    expected = rouge_l_f1([decode(o[prefix:]) for o in own], [decode(t[prefix:]) for t in truth])
    assert scored["per_prompt"] == pytest.approx(expected) and scored["score"] < 1
    assert chunk_verbmem_set("forget", [t[:prefix] for t in truth], tokenizer, prefix, new) is None  # nothing after


def test_knowmem_prompt_and_first_line_answer_by_hand(toy_model, tmp_path):
    from dsunlearn.config import ConfigError
    from dsunlearn.eval.generate import first_line, knowmem_prompt
    from dsunlearn.eval.memorisation import read_pairs
    assert knowmem_prompt("Who?", [("Q1", "A1"), ("Q2", "A2")]) == \
        "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer: A2\n\nQuestion: Who?\nAnswer: "
    assert first_line("  w3 w4\nQuestion: next") == "w3 w4" and first_line("") == ""
    model, tokenizer = toy_model
    pairs = [("Which word follows w1?", "w2"), ("Which word follows w3 w4?", "w5 w6"), ("And w7?", "w8")]
    scored = score_set(model, knowmem_set("forget", pairs, tokenizer, [("Which word follows w0?", "w1")], 5, "here"),
                       tokenizer)
    # By hand: each prompt on its own through the plain greedy loop, cut at the first line break, ROUGE-L F1.
    by_hand = []
    for q, a in pairs:
        ids = tokenizer(knowmem_prompt(q, [("Which word follows w0?", "w1")]))["input_ids"]
        text = tokenizer.decode(greedy_by_hand(model, ids, 5, tokenizer.eos_token_id), skip_special_tokens=True)
        by_hand.append(rouge_l_f1([first_line(text)], [a])[0])
    assert scored["per_prompt"] == pytest.approx(by_hand) and scored["score"] == pytest.approx(sum(by_hand) / 3)
    (tmp_path / "empty.json").write_text("[]")  # no questions: refused when the file is read, before any decoding
    with pytest.raises(ConfigError, match="no entries"):
        read_pairs(str(tmp_path / "empty.json"), ("question", "answer"))


def test_verbatim_criterion_by_hand():
    from dsunlearn.eval.memorisation import MIN_VERBMEM_BAND, verbatim_reference, verbmem_band
    from dsunlearn.eval.verdict import FORGOTTEN, NOT_FORGOTTEN, OVER_UNLEARNED, with_verbatim_criterion
    # Band: 2 sqrt(var(a)/n_a + var(b)/n_b) with sample variances; a = [0, 1, 0, 1]: var 1/3, /4 -> 1/12.
    assert verbmem_band([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(2 * (1 / 12 + 1 / 12) ** 0.5)
    assert verbmem_band([0.2] * 4, [0.1] * 4) == MIN_VERBMEM_BAND
    forgotten = {"status": FORGOTTEN, "ok": True, "reasons": [], "distance": 0.0,
                 "figures": {"forget_loss": 3.0, "target": 3.0}}
    same = with_verbatim_criterion(forgotten, "the twin's forget VerbMem", [0.10, 0.12], [0.09, 0.11], 0.05)
    assert same["ok"] and same["figures"]["verbmem_forget"] == pytest.approx(0.11)
    recites = with_verbatim_criterion(forgotten, "the twin's forget VerbMem", [0.5, 0.7], [0.1, 0.1], 0.05)
    assert recites["status"] == NOT_FORGOTTEN and not recites["ok"] and "VerbMem on forget 0.600 above" in \
        recites["reasons"][0] and recites["distance"] == pytest.approx(0.6 - 0.1 - 0.05)
    assert forgotten["ok"] and not forgotten["reasons"]  # the judgement it was given is not changed
    silent = with_verbatim_criterion(forgotten, "x", [0.0, 0.0], [0.3, 0.3], 0.05)
    assert silent["status"] == OVER_UNLEARNED and "below" in silent["reasons"][0]
    # The reference: the twin's forget VerbMem, else the original's on the approximate set.
    per = {"before": {"verbmem/approximate": [0.2]}, "after": {"verbmem/forget": [0.3]},
           "retrained": {"verbmem/forget": [0.1]}}
    assert verbatim_reference(per) == ("the twin's forget VerbMem", [0.3], [0.1])
    assert verbatim_reference({**per, "retrained": None})[2] == [0.2]
