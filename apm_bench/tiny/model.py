"""apm-tiny's tokenizer and architecture: a byte-level BPE with a ChatML template, and a small Llama.

The shape is one vLLM's CPU attention kernels take (head size 64) and small enough to ship in
the repository at fp16 (about 8.5 MB). The context (2048 positions) holds a RAG prompt with its
examples; training sees at most `max_train_tokens` of each example.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: the text that opens an answer in the template above, and the token that closes it
ANSWER_OPENING = "<|im_start|>assistant\n"
ANSWER_END = "<|im_end|>"


class TinyShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(default=4000, ge=300)
    hidden_size: int = Field(default=256, ge=16)
    intermediate_size: int = Field(default=768, ge=16)
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    kv_heads: int = Field(default=2, ge=1)
    context: int = Field(default=2048, ge=64, description="positions the model attends to")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the corpus, wrapped as a transformers tokenizer with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def new_model(tokenizer: PreTrainedTokenizerFast, shape: TinyShape, seed: int) -> LlamaForCausalLM:
    """Random weights from `seed`; generation stops at the end of the answer's turn."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer.model_max_length = shape.context
    pad, bos, eos, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|bos|>", "<|eos|>", ANSWER_END))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden_size // shape.heads, max_position_embeddings=shape.context, tie_word_embeddings=True,
        pad_token_id=pad, bos_token_id=bos, eos_token_id=[end, eos],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=pad, bos_token_id=bos, eos_token_id=[end, eos])
    return model
