"""A toy world built in code in about a second: generated documents, a small BPE tokenizer, a tiny random Llama.

Used by the tests and by anyone who wants to try a command without the demo world. Nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .data import follow_umask

SPLITS = ("forget", "retain", "approximate", "general")


def generate_documents(num_docs: int, seed: int, words_per_doc: int = 120, vocab_size: int = 300,
                       prefix: str = "w") -> list[str]:
    """Documents of Zipf-distributed pseudo-words from one generator (different seeds -> different documents)."""
    rng = random.Random(seed)
    vocab = [f"{prefix}{i}" for i in range(vocab_size)]
    weights = [1.0 / (i + 1) for i in range(vocab_size)]
    docs = []
    for _ in range(num_docs):
        words = rng.choices(vocab, weights=weights, k=words_per_doc)
        sentences = [" ".join(words[i:i + 12]) + "." for i in range(0, len(words), 12)]
        docs.append(" ".join(sentences))
    return docs


def train_toy_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 512):
    """A byte-level BPE in HF format (loads with AutoTokenizer.from_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_llama(out_dir: str, tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    seq_len: int = 128, seed: int = 0) -> str:
    """Save a randomly initialised LlamaForCausalLM (safetensors) with the tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2 + 32,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max(seq_len, 128), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    follow_umask(out_dir)  # safetensors writes 0600 (data.follow_umask)
    return out_dir


def write_jsonl(path: Path, texts: list[str], prefix: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"{prefix}/{i}", "text": text}) + "\n")


def build_toy_world(root: str, num_docs: int = 16, seed: int = 0, **model_kwargs) -> dict[str, str]:
    """Write forget/retain/approximate/general JSONL files, a tokenizer and a tiny model under ``root``.

    Returns the paths: {"model": ..., "forget": ..., ...}.
    """
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    texts = {name: generate_documents(num_docs, seed=seed * 100 + i) for i, name in enumerate(SPLITS)}
    paths = {}
    for name, docs in texts.items():
        paths[name] = str(root_path / f"{name}.jsonl")
        write_jsonl(Path(paths[name]), docs, name)
    tokenizer = train_toy_tokenizer([t for docs in texts.values() for t in docs], str(root_path / "model"))
    paths["model"] = make_tiny_llama(str(root_path / "model"), tokenizer, seed=seed, **model_kwargs)
    return paths
