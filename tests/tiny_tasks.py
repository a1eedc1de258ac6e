"""Tiny model folders and data for the tasks other than causal LM (`model.task`), built in-process
in well under a second: a 2-layer BERT encoder with a WordPiece tokenizer (seq_cls, token_cls) and a
2-layer T5 with a BPE tokenizer that ends every sequence with </s> (seq2seq_lm)."""

from __future__ import annotations

import json
import random
import string
import tempfile
from pathlib import Path

NAMES = ["alice", "bob", "carol", "dave"]
SURNAMES = ["smith", "jones"]
CITIES = ["paris", "rome", "oslo"]
WORDS = ["the", "a", "movie", "food", "was", "is", "very", "quite", "and", "in", "met", "lives", "visited",
         "good", "great", "bad", "awful", "today", "friend", "city"]


def build_bert(folder: Path, seed: int = 0) -> Path:
    """A BERT encoder (BertModel: no head, so classification heads are new) and its WordPiece
    tokenizer; words outside the vocabulary split into letters (## pieces)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *NAMES, *SURNAMES, *CITIES, *letters,
             *[f"##{c}" for c in letters]]
    # From a vocab.txt: the one way both transformers 4 (BertTokenizerFast(vocab=dict) is not there) and
    # 5 build it.
    with tempfile.TemporaryDirectory() as words:
        (Path(words) / "vocab.txt").write_text("".join(piece + "\n" for piece in vocab))
        tok = BertTokenizerFast.from_pretrained(words)
    tok.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def build_t5(folder: Path, seed: int = 0) -> Path:
    """A T5 encoder-decoder (T5ForConditionalGeneration) and a byte-level BPE tokenizer: <pad> 0 (also
    the decoder's start token), </s> 1 appended to every sequence, <unk> 2."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS + NAMES + CITIES)] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = T5Config(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="relu")
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_classification(path: Path, n: int, seed: int = 0, int_labels: bool = False) -> Path:
    """Sentiment rows {text, label}: pos when the text says good or great, neg for bad or awful."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(["good", "great", "bad", "awful"])
        label = "pos" if word in ("good", "great") else "neg"
        text = f"the {rng.choice(['movie', 'food'])} {rng.choice(['was', 'is'])} {rng.choice(['very', 'quite'])} {word}"
        rows.append({"text": text, "label": (1 if label == "pos" else 0) if int_labels else label})
    return _jsonl(path, rows)


def write_tagging(path: Path, n: int, seed: int = 0) -> Path:
    """Rows {tokens, tags} with IOB2 tags: PER (a name, maybe a surname; some names unknown to the
    vocabulary, so that they split into sub-tokens) and LOC (a city)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = rng.choice(NAMES + ["zorbo", "quix"])
        person = [name] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
        city = rng.choice(CITIES)
        tokens = [*person, rng.choice(["lives", "visited"]), "in", city, "today"]
        tags = ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O", "B-LOC", "O"]
        rows.append({"tokens": tokens, "tags": tags})
    return _jsonl(path, rows)


def write_seq2seq(path: Path, n: int, seed: int = 0) -> Path:
    """Completion rows: the prompt names a city among other words; the completion is the city."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        city = rng.choice(CITIES)
        rows.append({"prompt": f"{rng.choice(NAMES)} visited {city} today", "completion": city})
    return _jsonl(path, rows)
