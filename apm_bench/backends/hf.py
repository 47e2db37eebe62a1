"""The transformers engine: chat generation with seeds, LoRA adapters (peft), soft prompts, gradients.

It is the engine methods train against: besides `generate`, it exposes the torch module (`lm`), the
tokenizer and `sequence_logprob`, the differentiable log-probability of a response given a request.

Sampling is done by this module, not by transformers: `model.generate` runs greedy decoding, and a
logits processor replaces each step's scores by a one-hot choice drawn with the row's own
`torch.Generator` (seeded by the request's seed). A request's text therefore depends on its seed
and prompt only, never on which other requests share its batch, and batching stays on for every
temperature. Log-probabilities are those of the model itself (temperature 1, no top-p), as vLLM
reports them, and they include the stop token when generation ended on one.

torch, transformers and peft are imported inside the functions that need them, so importing
apm_bench stays fast.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apm_bench.backends.base import (
    AdapterRef,
    Backend,
    Capabilities,
    Generation,
    GenerationRequest,
    SamplingParams,
    identified_model,
    within_context,
)
from apm_bench.errors import ConfigError

if TYPE_CHECKING:
    import torch

ENGINE_OPTIONS = ("batch_size", "chat_template_kwargs", "device", "dtype")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class HFGeneration:
    """A generation with the token ids behind it (what training code needs to score it exactly)."""

    generation: Generation
    completion_ids: tuple[int, ...]
    stopped: bool  # ended on a stop token (as opposed to reaching max_tokens)


@dataclass
class _Prepared:
    """A request turned into what the model reads: prompt ids and optional soft-prompt rows."""

    index: int
    prompt_ids: list[int]
    soft: torch.Tensor | None
    params: SamplingParams
    seed: int

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + (0 if self.soft is None else int(self.soft.shape[0]))


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown hf engine option(s) {', '.join(unknown)}; known: {', '.join(ENGINE_OPTIONS)}")
    kwargs = options.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"hf engine option chat_template_kwargs must be a mapping, got {kwargs!r}")
    dtype = options.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ConfigError(f"hf engine option dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    batch_size = options.get("batch_size", 8)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"hf engine option batch_size must be a positive integer, got {batch_size!r}")
    device = options.get("device", "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"hf engine option device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return {"chat_template_kwargs": dict(kwargs), "dtype": dtype, "batch_size": batch_size, "device": device}


def _check_params(params: SamplingParams) -> None:
    if params.temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {params.max_tokens}")


class _RowSampler:
    """Logits processor + stopping criterion: picks each row's token with the row's own generator.

    Returns scores that are 0 at the chosen token and -inf elsewhere, so greedy decoding in
    `generate` emits exactly that token. Records each step's chosen log-probability (and top
    alternatives when asked) under the unmodified model distribution.
    """

    def __init__(self, rows: Sequence[_Prepared]) -> None:
        import torch

        self.params = [r.params for r in rows]
        self.generators = []
        for row in rows:
            generator = torch.Generator()
            generator.manual_seed(int(row.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            self.generators.append(generator)
        self.top_k = max(p.top_logprobs for p in self.params)
        self.chosen_logprobs: list[torch.Tensor] = []  # per step: (batch,)
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: values, indices (batch, k)

    @property
    def steps(self) -> int:
        return len(self.chosen_logprobs)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        scores = scores.float()
        logprobs = torch.log_softmax(scores, dim=-1)
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for row, params in enumerate(self.params):
            chosen[row] = self._pick(scores[row], params, self.generators[row])
        self.chosen_logprobs.append(logprobs.gather(1, chosen[:, None])[:, 0].cpu())
        if self.top_k:
            values, indices = logprobs.topk(self.top_k, dim=-1)
            self.top.append((values.cpu(), indices.cpu()))
        onehot = torch.full_like(scores, float("-inf"))
        onehot.scatter_(1, chosen[:, None], 0.0)
        return onehot

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        import torch

        if params.temperature == 0:
            return logits.argmax()
        probs = torch.softmax(logits / params.temperature, dim=-1)
        order = None
        if params.top_p < 1:
            probs, order = probs.sort(descending=True)
            before = probs.cumsum(-1) - probs  # mass strictly before each token; the first always stays
            probs = probs.masked_fill(before >= params.top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.rand((), generator=generator).to(cdf.device) * cdf[-1]
        position = torch.searchsorted(cdf, u[None], right=True).clamp(max=cdf.shape[0] - 1)[0]
        return position if order is None else order[position]

    def stop_rows(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Stopping criterion: a row is done once it has its own max_tokens."""
        import torch

        return torch.tensor([self.steps >= p.max_tokens for p in self.params], device=input_ids.device)


class HFBackend(Backend):
    """A transformers causal LM (+ peft adapters) on one device.

    `model` is the hub id or path (the Backend interface); the torch module is `lm` (a PeftModel once
    an adapter is loaded or added) and the tokenizer is `tokenizer`.
    """

    name = "hf"
    capabilities = Capabilities(logprobs=True, adapters=True, soft_prompts=True, trainable=True, batch_invariant=False)

    def __init__(self, model: str, **options: Any) -> None:
        checked = _check_options(options)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model = model
        self.chat_template_kwargs: dict[str, Any] = checked["chat_template_kwargs"]
        self.batch_size: int = checked["batch_size"]
        self.dtype_name: str = checked["dtype"]
        self.dtype = getattr(torch, self.dtype_name)
        self.device = torch.device(checked["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"hf engine option device={checked['device']!r}, but torch sees no CUDA device")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot load hf model {model!r}: {first_line}") from exc
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError(f"hf model {model!r} has no chat template; the benchmark sends chat messages")
        lm.to(self.device)
        lm.eval()

        # Stop on every end token the model declares (ChatML models end turns on <|im_end|>, etc.).
        declared = lm.generation_config.eos_token_id
        declared = [declared] if isinstance(declared, int) else list(declared or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in declared:
            declared.append(self.tokenizer.eos_token_id)
        if not declared:
            raise ConfigError(f"hf model {model!r} declares no end-of-sequence token")
        self.stop_ids: tuple[int, ...] = tuple(declared)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = lm.generation_config.pad_token_id
        self.pad_id: int = int(self.stop_ids[0] if pad is None else pad)
        # A clean generation config: the checkpoint's sampling defaults (repetition penalty, top-k...)
        # must not act behind the benchmark's SamplingParams; generate() fills unset fields from here.
        lm.generation_config = GenerationConfig(
            pad_token_id=self.pad_id, eos_token_id=list(self.stop_ids), bos_token_id=lm.generation_config.bos_token_id
        )
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters
        self.lm = lm
        self.hidden_size: int = lm.get_input_embeddings().embedding_dim
        self._adapters: dict[str, tuple[str | None, bool]] = {}  # name -> (path, trainable)
        self._stop_token_id: int | None = None

    # -- interface ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        kwargs = json.dumps(self.chat_template_kwargs, sort_keys=True, default=str)
        return f"{self.name}:{identified_model(self.model)}:{self.dtype_name}:{kwargs}"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [g.generation for g in self.generate_with_ids(requests)]

    def context_window(self) -> int | None:
        """The model's position limit: past it a learned-position model fails and a rotary one degrades."""
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        return int(limit) if isinstance(limit, int) and limit > 0 else None

    def prompt_tokens(self, request: GenerationRequest) -> int:
        return self._prepare(0, request).length

    def close(self) -> None:
        self.lm = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    # -- generation --------------------------------------------------------------------------

    def generate_with_ids(self, requests: Sequence[GenerationRequest]) -> list[HFGeneration]:
        """Like `generate`, plus each completion's token ids (stop token included when it stopped)."""
        import torch

        for request in requests:
            _check_params(request.params)
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        results: list[HFGeneration | None] = [None] * len(requests)
        for row, fitted in zip(prepared, within_context(requests, [p.length for p in prepared], self.context_window())):
            if isinstance(fitted, Generation):
                results[row.index] = HFGeneration(fitted, (), stopped=False)
            else:
                row.params = fitted.params
        modes = [(m, m.training) for m in self.lm.modules()]  # training code may have set some to train
        self.lm.eval()
        try:
            with torch.no_grad():
                for adapter, indices in self._adapter_groups(requests):
                    with self._adapter_scope(adapter):
                        # similar lengths together: less padding (results do not depend on the batch)
                        ordered = sorted((i for i in indices if results[i] is None), key=lambda i: prepared[i].length)
                        for start in range(0, len(ordered), self.batch_size):
                            rows = [prepared[i] for i in ordered[start : start + self.batch_size]]
                            for row, output in zip(rows, self._generate_batch(rows)):
                                results[row.index] = output
        finally:
            for module, training in modes:
                module.training = training
        return results  # type: ignore[return-value]

    def _generate_batch(self, rows: Sequence[_Prepared]) -> list[HFGeneration]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        inputs = self._batch_inputs(rows, [[] for _ in rows])
        sampler = _RowSampler(rows)
        config = GenerationConfig(
            max_new_tokens=max(r.params.max_tokens for r in rows),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=list(self.stop_ids),
        )
        output = self.lm.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([sampler.stop_rows]),
        )
        new_tokens = output[:, output.shape[1] - sampler.steps :].cpu()
        chosen = torch.stack(sampler.chosen_logprobs, dim=1) if sampler.steps else torch.zeros(len(rows), 0)
        stops = set(self.stop_ids)
        results = []
        for b, row in enumerate(rows):
            tokens = new_tokens[b, : row.params.max_tokens].tolist()
            length, stopped = len(tokens), False
            for k, token in enumerate(tokens):
                if token in stops:
                    length, stopped = k + 1, True
                    break
            ids = tokens[:length]
            top = None
            if row.params.top_logprobs:
                top = tuple(self._top_dict(sampler, k, b, row.params.top_logprobs) for k in range(length))
            generation = Generation(
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                logprob=float(chosen[b, :length].double().sum()) if row.params.logprobs else None,
                prompt_tokens=row.length,
                completion_tokens=length,
                top_logprobs=top,
            )
            results.append(HFGeneration(generation, tuple(ids), stopped))
        return results

    def _top_dict(self, sampler: _RowSampler, step: int, row: int, k: int) -> dict[str, float]:
        values, indices = sampler.top[step]
        alternatives: dict[str, float] = {}
        for value, index in zip(values[row, :k].tolist(), indices[row, :k].tolist()):
            alternatives.setdefault(self.tokenizer.decode([index]), value)  # best first; keep the best of equal strings
        return alternatives

    # -- scoring (training) --------------------------------------------------------------------

    @property
    def stop_token_id(self) -> int:
        """The token that ends an assistant turn in the chat template (appended to scored responses)."""
        if self._stop_token_id is None:
            self._stop_token_id = self._find_turn_end()
        return self._stop_token_id

    def _find_turn_end(self) -> int:
        marker = "\x00RESPONSE\x00"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                tokenize=False,
                **self.chat_template_kwargs,
            )
        except Exception:  # a template may refuse this conversation: fall back to the first stop token
            return self.stop_ids[0]
        if isinstance(text, str) and marker in text:
            after = self.tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            for token in after:
                if token in self.stop_ids:
                    return int(token)
        return self.stop_ids[0]

    def sequence_logprob(
        self,
        requests: Sequence[GenerationRequest],
        responses: Sequence[str | Sequence[int]],
        add_stop: bool = True,
    ) -> torch.Tensor:
        """Summed log-probability of each response after its request's chat prompt, with gradients.

        A response is text (tokenized without special tokens, then the template's end-of-turn token
        appended unless `add_stop` is False) or a list of token ids used as they are (e.g.
        `HFGeneration.completion_ids`). The request's adapter and soft prompt apply; a soft prompt
        given as a torch tensor with requires_grad receives gradients. Returns a float32 tensor of
        shape (len(requests),) on the engine's device; the module's train/eval mode is left as it is.
        """
        import torch

        if len(requests) != len(responses):
            raise ConfigError(f"{len(requests)} requests but {len(responses)} responses")
        targets: list[list[int]] = []
        for response in responses:
            if isinstance(response, str):
                ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
                targets.append(list(ids) + ([self.stop_token_id] if add_stop else []))
            else:
                targets.append([int(t) for t in response])
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        pieces: dict[int, torch.Tensor] = {}
        for adapter, indices in self._adapter_groups(requests):
            with self._adapter_scope(adapter):
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    scores = self._score_batch([prepared[i] for i in chunk], [targets[i] for i in chunk])
                    for j, i in enumerate(chunk):
                        pieces[i] = scores[j]
        if not pieces:
            return torch.zeros(0, device=self.device)
        return torch.stack([pieces[i] for i in range(len(requests))])

    def _score_batch(self, rows: Sequence[_Prepared], targets: Sequence[list[int]]) -> torch.Tensor:
        import torch

        width = max(len(t) for t in targets)
        if width == 0:
            return torch.zeros(len(rows), device=self.device)
        inputs = self._batch_inputs(rows, targets)
        mask = inputs["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": width + 1} if self._keeps_logits else {}
        output = self.lm(**inputs, position_ids=position_ids, use_cache=False, **keep)
        logits = output.logits[:, -(width + 1) : -1].float()  # the positions that predict the responses
        # responses are right-aligned (left padding): row b's tokens fill the last len(target) slots
        wanted = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((len(rows), width), dtype=torch.bool, device=self.device)
        for b, target in enumerate(targets):
            if target:
                wanted[b, width - len(target) :] = torch.tensor(target, device=self.device)
                valid[b, width - len(target) :] = True
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(2, wanted[..., None])[..., 0]
        return (token_logprobs * valid).sum(dim=1)

    # -- shared plumbing ---------------------------------------------------------------------

    def _prepare(self, index: int, request: GenerationRequest) -> _Prepared:
        if not request.messages:
            raise ConfigError("a generation request needs at least one message")
        kwargs = dict(self.chat_template_kwargs)
        if request.params.reasoning_effort is not None:
            kwargs["reasoning_effort"] = request.params.reasoning_effort
        conversation = [{"role": m.role, "content": m.content} for m in request.messages]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **kwargs)
        text += request.prefill or ""
        prompt_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return _Prepared(index, prompt_ids, self._soft_tensor(request), request.params, request.seed)

    def _soft_tensor(self, request: GenerationRequest) -> torch.Tensor | None:
        import torch

        if request.soft_prompt is None:
            return None
        embeddings = request.soft_prompt.embeddings
        shape = tuple(embeddings.shape)
        if len(shape) != 2 or shape[1] != self.hidden_size:
            raise ConfigError(
                f"soft prompt has shape {shape}; model {self.model!r} needs (m, {self.hidden_size})"
            )
        if shape[0] == 0:
            return None
        if isinstance(embeddings, torch.Tensor):
            return embeddings.to(device=self.device, dtype=self.dtype)  # keeps the autograd graph
        return torch.as_tensor(np.asarray(embeddings), dtype=self.dtype, device=self.device)

    def _batch_inputs(self, rows: Sequence[_Prepared], suffixes: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for [soft prompt, prompt ids, suffix ids] per row.

        Token ids when no row has a soft prompt; otherwise input embeddings, the soft rows placed
        before the template's tokens (BOS included, as peft's prompt tuning does).
        """
        import torch

        sequences = [r.prompt_ids + list(s) for r, s in zip(rows, suffixes)]
        lengths = [len(seq) + (0 if r.soft is None else r.soft.shape[0]) for r, seq in zip(rows, sequences)]
        total = max(lengths)
        mask = torch.zeros((len(rows), total), dtype=torch.long, device=self.device)
        for b, length in enumerate(lengths):
            mask[b, total - length :] = 1
        if all(r.soft is None for r in rows):
            ids = torch.full((len(rows), total), self.pad_id, dtype=torch.long, device=self.device)
            for b, seq in enumerate(sequences):
                ids[b, total - len(seq) :] = torch.tensor(seq, dtype=torch.long, device=self.device)
            return {"input_ids": ids, "attention_mask": mask}
        embed = self.lm.get_input_embeddings()
        padded = []
        for b, (row, seq) in enumerate(zip(rows, sequences)):
            ids = torch.tensor([self.pad_id] * (total - lengths[b]) + seq, dtype=torch.long, device=self.device)
            tokens = embed(ids)
            if row.soft is not None:
                cut = total - lengths[b]
                tokens = torch.cat([tokens[:cut], row.soft.to(tokens.dtype), tokens[cut:]], dim=0)
            padded.append(tokens)
        return {"inputs_embeds": torch.stack(padded), "attention_mask": mask}

    # -- adapters ----------------------------------------------------------------------------

    @staticmethod
    def _adapter_groups(requests: Sequence[GenerationRequest]) -> list[tuple[AdapterRef | None, list[int]]]:
        groups: dict[str | None, tuple[AdapterRef | None, list[int]]] = {}
        for i, request in enumerate(requests):
            key = request.adapter.name if request.adapter else None
            if key in groups:
                seen = groups[key][0]
                if seen is not None and request.adapter is not None and seen.path != request.adapter.path:
                    if seen.path is None:
                        groups[key] = (request.adapter, groups[key][1])
                    elif request.adapter.path is not None:
                        raise ConfigError(f"adapter {key!r} is given two paths: {seen.path!r} and {request.adapter.path!r}")
                groups[key][1].append(i)
            else:
                groups[key] = (request.adapter, [i])
        return list(groups.values())

    def _adapter_scope(self, adapter: AdapterRef | None):
        from peft import PeftModel

        if adapter is None:
            return self.lm.disable_adapter() if isinstance(self.lm, PeftModel) else nullcontext()
        self.load_adapter(adapter)
        _, trainable = self._adapters[adapter.name]
        self.lm.set_adapter(adapter.name, inference_mode=not trainable)
        return nullcontext()

    def load_adapter(self, adapter: AdapterRef) -> None:
        """Load a saved peft adapter once; a known name given a different path is reloaded from there."""
        from peft import PeftModel

        if adapter.name in self._adapters:
            known_path, _ = self._adapters[adapter.name]
            if adapter.path is None or adapter.path == known_path:
                return
            self.unload_adapter(adapter.name)
        if adapter.path is None:
            raise ConfigError(f"adapter {adapter.name!r} is neither loaded nor given a path")
        try:
            if isinstance(self.lm, PeftModel):
                self.lm.load_adapter(adapter.path, adapter_name=adapter.name)
            else:
                self.lm = PeftModel.from_pretrained(self.lm, adapter.path, adapter_name=adapter.name)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot load adapter {adapter.name!r} from {adapter.path!r}: {first_line}") from exc
        self.lm.eval()
        self._adapters[adapter.name] = (adapter.path, False)

    def add_adapter(self, name: str, peft_config: Any) -> Any:
        """Attach a new trainable adapter (e.g. a peft LoraConfig); requests reach it as AdapterRef(name)."""
        from peft import PeftModel, get_peft_model

        if name in self._adapters:
            raise ConfigError(f"adapter {name!r} already exists")
        if isinstance(self.lm, PeftModel):
            self.lm.add_adapter(name, peft_config)
        else:
            self.lm = get_peft_model(self.lm, peft_config, adapter_name=name)
        self._adapters[name] = (None, True)
        return self.lm

    def create_adapter(self, name: str, rank: int = 16, seed: int = 0, alpha: float | None = None, dropout: float = 0.0,
                       targets: str | list[str] = "all-linear") -> list[Any]:
        """A new trainable LoRA adapter (the trainer interface shared with `sim`): α defaults to 2·rank,
        and it sits on every linear layer unless `targets` names modules (e.g. q/k/v/o_proj)."""
        import torch
        from peft import LoraConfig

        torch.manual_seed(seed)  # peft draws lora_A at random; the seed makes training reproducible
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets,
                            lora_dropout=dropout)
        self.add_adapter(name, config)
        return self.adapter_parameters(name)

    def adapter_parameters(self, name: str) -> list[Any]:
        """The adapter's weights, switched to trainable (peft names them `...lora_A.<name>.weight`)."""
        if name not in self._adapters:
            raise ConfigError(f"adapter {name!r} does not exist")
        parameters = [p for key, p in self.lm.named_parameters() if f".{name}." in key]
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def save_adapter(self, name: str, directory: Path) -> Path:
        """Save in the PEFT layout that `PeftModel.from_pretrained` and vLLM's LoRARequest read:
        adapter_config.json + adapter_model.safetensors, directly in `directory`."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if name not in self._adapters:
            raise ConfigError(f"adapter {name!r} does not exist")
        directory.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.lm, adapter_name=name)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(directory / "adapter_model.safetensors"))
        config = self.lm.peft_config[name]
        config.base_model_name_or_path = self.model
        config.save_pretrained(str(directory))
        for parameter in self.adapter_parameters(name):
            parameter.requires_grad_(False)
        self._adapters[name] = (str(directory), False)
        return directory

    @property
    def soft_prompt_width(self) -> int:
        return self.hidden_size

    def response_length(self, responses: Sequence[str | Sequence[int]]) -> list[int]:
        """Tokens per response, end-of-turn token included (as `sequence_logprob` scores them)."""
        return [len(r) if not isinstance(r, str) else len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) + 1
                for r in responses]

    def response_ids(self, responses: Sequence[str], limit: int) -> list[list[int]]:
        """Each response's tokens and the end-of-turn token, cut after `limit` tokens (a cut response
        loses its end: the model is not taught to stop where the text was cut)."""
        return [(list(self.tokenizer(r, add_special_tokens=False)["input_ids"]) + [self.stop_token_id])[:limit]
                for r in responses]

    @contextmanager
    def training(self) -> Iterator[None]:
        """Train mode (dropout on, e.g. LoRA's) for the duration of a training run, eval mode after."""
        self.lm.train()
        try:
            yield
        finally:
            self.lm.eval()

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (e.g. before loading retrained weights saved at the same path)."""
        if name in self._adapters:
            self.lm.delete_adapter(name)
            del self._adapters[name]

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)
