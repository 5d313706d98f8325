"""Tiny Llama-architecture models and learnable datasets, built on the fly.

Nothing can be downloaded here, so `farm demo`, the tests and the benchmarks build a real (if small) model: a
`LlamaForCausalLM` from a config with seeded random weights, plus a byte-level BPE tokenizer trained in
milliseconds on a built-in English corpus. Both are saved with `save_pretrained`, so they load through
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(path)` exactly like a model from a hub.

torch, transformers and tokenizers are imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# A role header token, the content, then eos: the assistant's turn ends with eos so a trained adapter learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

# The datasets below draw on these words: a mapping the model can learn in a few dozen steps.
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "duck", "goat", "lion", "wolf", "deer", "fish"]
COLORS = ["red", "blue", "green", "brown", "white", "black", "gray", "pink", "gold", "orange", "yellow", "purple"]
FOODS = ["bread", "apples", "honey", "seeds", "grass", "fish", "corn", "berries", "cheese", "rice", "nuts", "plums"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]

_CORPUS_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model learns simple patterns from a small amount of text.",
    "Please answer the question in one short sentence.",
    "What color is the animal? The animal is brown.",
    "Repeat the word three times, then stop.",
    "Count from one to ten: one two three four five six seven eight nine ten.",
    "The user asks a question and the assistant gives a helpful answer.",
    "Instruction: write the answer. Input: the question. Response: the answer.",
    "Training a language model means lowering its loss on the data it sees.",
    "We measure the loss, the learning rate, and the number of tokens per second.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Every adapter is stored with a checksum, so nobody loads a broken file.",
]


def _corpus() -> list[str]:
    """Built-in English text: fixed sentences plus every sentence the datasets can produce."""
    lines = list(_CORPUS_SENTENCES)
    for i, animal in enumerate(ANIMALS):
        color, food = COLORS[i], FOODS[i]
        lines.append(f"What color is the {animal}? The {animal} is {color}.")
        lines.append(f"The {animal} likes {food}. The {animal} is {color}.")
        lines.append(f"Repeat the word: {animal} {animal} {animal}")
    lines.append(" ".join(NUMBER_WORDS) + " " + " ".join(str(n) for n in range(100)))
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the built-in corpus, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus is repeated so merge counts are stable; training is deterministic for a fixed input.
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: plain `tokenizer(text)` prepends bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=2048,
    )


def build_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 512,
) -> Path:
    """Save a seeded random Llama model and its trained tokenizer (safetensors) into `path`; return `path`.

    The same arguments give the same weights and tokenizer. Loads with `AutoModelForCausalLM.from_pretrained(path)`
    and `AutoTokenizer.from_pretrained(path)`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: with a 64-wide hidden state and 0.02 the output layer's logits can barely move,
        # so LoRA (which leaves lm_head alone) could not lower the loss much; 0.1 lets a few dozen steps show it.
        initializer_range=0.1,
        dtype="float32",
    )
    # fork_rng: building a model must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _chat_row(rng: random.Random) -> dict:
    i = rng.randrange(len(ANIMALS))
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "Answer in one short sentence."})
    messages.append({"role": "user", "content": f"What color is the {ANIMALS[i]}?"})
    messages.append({"role": "assistant", "content": f"The {ANIMALS[i]} is {COLORS[i]}."})
    if rng.random() < 0.3:
        messages.append({"role": "user", "content": f"What does the {ANIMALS[i]} like?"})
        messages.append({"role": "assistant", "content": f"The {ANIMALS[i]} likes {FOODS[i]}."})
    return {"messages": messages}


def _alpaca_row(rng: random.Random) -> dict:
    word = rng.choice(ANIMALS + COLORS)
    if rng.random() < 0.5:
        return {"instruction": "Repeat the word three times.", "input": word, "output": f"{word} {word} {word}"}
    i = rng.randrange(len(ANIMALS))
    return {"instruction": f"What color is the {ANIMALS[i]}?", "input": "",
            "output": f"The {ANIMALS[i]} is {COLORS[i]}."}


def _completion_row(rng: random.Random) -> dict:
    n = rng.randrange(0, 90)
    return {"prompt": f"Count from {n}:", "completion": " " + " ".join(str(n + k) for k in range(1, 6))}


def _text_row(rng: random.Random) -> dict:
    i = rng.randrange(len(ANIMALS))
    return {"text": f"The {ANIMALS[i]} likes {FOODS[i]}. The {ANIMALS[i]} is {COLORS[i]}."}


_ROW_MAKERS = {"chat": _chat_row, "alpaca": _alpaca_row, "completion": _completion_row, "text": _text_row}


def dataset_rows(format: str, n: int = 64, seed: int = 0) -> list[dict]:
    """`n` rows of a learnable dataset of the given format (chat, alpaca, completion, text)."""
    if format not in _ROW_MAKERS:
        raise ValueError(f"unknown dataset format {format!r}: use one of {', '.join(_ROW_MAKERS)}")
    rng = random.Random(seed)
    return [_ROW_MAKERS[format](rng) for _ in range(n)]


def write_dataset(path: Path, format: str, n: int = 64, seed: int = 0) -> Path:
    """Write `n` rows of a learnable JSONL dataset of `format` to `path` (deterministic for a seed); return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in dataset_rows(format, n, seed):
            fh.write(json.dumps(row) + "\n")
    return path
