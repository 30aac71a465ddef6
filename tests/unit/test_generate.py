"""Batched greedy decoding and VerbMem (dsunlearn/eval/generate.py), against a plain greedy loop written here."""
import pytest
import torch

from dsunlearn.eval.generate import generated_tokens, greedy_continuations, left_padded, rouge_l_f1, verbmem


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
    scored = verbmem(model, own, tokenizer, prefix, new)
    assert scored["num_prompts"] == len(own) and scored["verbmem"] == pytest.approx(1.0)
    # Other continuations (the toy world's text after the same prompts): the ROUGE-L F1 computed here.
    import json
    lines = [json.loads(line)["text"] for line in open(toy_world["forget"])][:len(own)]
    truth = [o[:prefix] + tokenizer(t)["input_ids"][:new] for o, t in zip(own, lines)]
    scored = verbmem(model, truth, tokenizer, prefix, new)
    expected = rouge_l_f1([decode(o[prefix:]) for o in own], [decode(t[prefix:]) for t in truth])
    assert scored["per_prompt"] == pytest.approx(expected) and scored["verbmem"] < 1
    assert verbmem(model, [t[:prefix] for t in truth], tokenizer, prefix, new) is None  # nothing after the prompt
