"""The transformers engine on a tiny random model built on the spot (no download, CPU only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_lm import HIDDEN_SIZE, build_lora_adapter, build_tiny_model  # noqa: E402

from apm_bench.backends import load_backend  # noqa: E402
from apm_bench.backends.base import AdapterRef, GenerationRequest, SamplingParams, SoftPrompt, chat  # noqa: E402
from apm_bench.backends.hf import HFBackend  # noqa: E402
from apm_bench.errors import ConfigError  # noqa: E402

PROMPTS = [
    "Hello there, how are you?",
    "Explain the quaint brai thoust in a few words please, then stop.",
    "x",
    "Write a short poem about a lighthouse keeper and the sea.",
]
RESPONSE = "Brai thoust chand lou, stea mip."
RESPONSES = [RESPONSE, "Quest 42!", "The lighthouse keeper sleeps."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: with several threads, OpenMP hand-offs cost 10-50x the work on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora"))


@pytest.fixture
def backend(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(str(tiny_model_dir), batch_size=4)


def requests_for(seeds, params: SamplingParams, **extra) -> list[GenerationRequest]:
    return [GenerationRequest(chat(p), seed=s, params=params, **extra) for p, s in zip(PROMPTS, seeds)]


def texts(generations) -> list[str]:
    return [g.text for g in generations]


def manual_logprob(backend: HFBackend, request: GenerationRequest, response_ids: list[int]) -> float:
    """The response's log-probability from one unpadded forward pass, written independently of the engine."""
    conversation = [{"role": m.role, "content": m.content} for m in request.messages]
    prompt = backend.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(backend.lm(input_ids=ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    return sum(float(logprobs[n - 1 + k, t]) for k, t in enumerate(response_ids))


def test_importing_the_backend_loads_no_engine_library() -> None:
    code = "import sys, apm_bench.backends.hf; print(sorted(m for m in ('transformers', 'peft', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_batched_generation_is_reproducible_per_seed(backend: HFBackend, tiny_model_dir: Path) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=8)
    requests = requests_for([11, 12, 13, 14], params)
    batch = backend.generate(requests)
    assert len(batch) == 4 and all(g.text.strip() for g in batch)
    assert all(g.completion_tokens == 8 or g.completion_tokens < 8 for g in batch)
    assert len({g.prompt_tokens for g in batch}) > 1  # different prompt lengths: the batch was padded
    assert all(g.logprob is None for g in batch)

    # each alone, and in another composition with other batch boundaries: the same texts
    alone = [backend.generate([r])[0] for r in requests]
    assert texts(alone) == texts(batch)
    other = HFBackend(str(tiny_model_dir), batch_size=3)
    noise = requests_for([99, 98], SamplingParams(temperature=1.0, max_tokens=5))
    mixed = other.generate([noise[0], requests[2], requests[0], noise[1], requests[3], requests[1]])
    assert texts([mixed[2], mixed[5], mixed[1], mixed[4]]) == texts(batch)

    reseeded = backend.generate(requests_for([111, 112, 113, 114], params))
    assert texts(reseeded) != texts(batch)

    # greedy ignores the seed and stays batched
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    first = backend.generate(requests_for([1, 2, 3, 4], greedy))
    assert texts(first) == texts(backend.generate(requests_for([5, 6, 7, 8], greedy)))
    assert texts(first) == [backend.generate([r])[0].text for r in requests_for([1, 2, 3, 4], greedy)]


def test_logprob_matches_an_independent_rescoring(backend: HFBackend) -> None:
    # Rescoring the decoded *text* would not do: the random model emits token sequences the BPE would
    # merge differently (e.g. "th" + "oust" where the tokenizer writes "thoust"), so the comparison uses
    # the generated token ids, scored again by a separate full forward pass (no cache, no padding).
    variants = [
        SamplingParams(temperature=1.0, max_tokens=10, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=6, logprobs=True),
        SamplingParams(temperature=0.0, max_tokens=10, logprobs=True),
        SamplingParams(temperature=1.0, max_tokens=4, logprobs=True),
    ]
    requests = [GenerationRequest(chat(p), seed=i, params=v) for i, (p, v) in enumerate(zip(PROMPTS, variants))]
    outputs = backend.generate_with_ids(requests)
    rescored = backend.sequence_logprob(requests, [list(o.completion_ids) for o in outputs]).detach()
    for request, output, again in zip(requests, outputs, rescored):
        generation = output.generation
        assert generation.logprob is not None and generation.logprob < 0
        assert generation.completion_tokens == len(output.completion_ids) <= request.params.max_tokens
        assert output.stopped or generation.completion_tokens == request.params.max_tokens
        assert generation.logprob == pytest.approx(float(again), abs=1e-4)
        assert generation.logprob == pytest.approx(manual_logprob(backend, request, list(output.completion_ids)), abs=1e-4)
    top = outputs[0].generation.top_logprobs
    assert top is not None and len(top) == outputs[0].generation.completion_tokens
    assert all(1 <= len(d) <= 3 and all(v <= 0 for v in d.values()) for d in top)
    assert outputs[1].generation.top_logprobs is None


def test_text_responses_are_scored_with_the_end_of_turn_token(backend: HFBackend) -> None:
    im_end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert backend.stop_token_id == im_end  # read from the chat template, not just the first eos id
    requests = requests_for([0, 0], SamplingParams())
    scores = backend.sequence_logprob(requests, [RESPONSE, "Quest"])
    for request, text, score in zip(requests, [RESPONSE, "Quest"], scores.tolist()):
        ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"] + [im_end]
        assert score == pytest.approx(manual_logprob(backend, request, ids), abs=1e-4)
    without_stop = backend.sequence_logprob(requests[:1], [RESPONSE], add_stop=False)
    assert without_stop.tolist()[0] > scores.tolist()[0]


def test_lora_adapter_changes_outputs_and_mixes_in_a_batch(tiny_model_dir: Path, lora_dir: Path, tmp_path: Path) -> None:
    plain = HFBackend(str(tiny_model_dir), batch_size=4)
    backend = HFBackend(str(tiny_model_dir), batch_size=4)
    adapter = AdapterRef("style", str(lora_dir))
    request = GenerationRequest(chat(PROMPTS[0]), seed=3, params=SamplingParams(max_tokens=8, logprobs=True))
    with_adapter = GenerationRequest(request.messages, request.seed, request.params, adapter=adapter)

    base_score, adapted_score = backend.sequence_logprob([request, with_adapter], [RESPONSE, RESPONSE]).tolist()
    assert abs(adapted_score - base_score) > 0.05
    assert backend.adapters == ["style"]

    # generation really ran through the adapter: its log-prob is the adapted model's, not the base's
    output = backend.generate_with_ids([with_adapter])[0]
    ids = [list(output.completion_ids)]
    assert output.generation.logprob == pytest.approx(backend.sequence_logprob([with_adapter], ids).tolist()[0], abs=1e-4)
    assert abs(output.generation.logprob - backend.sequence_logprob([request], ids).tolist()[0]) > 0.05

    # mixed batches equal separate calls; requests without adapter equal a backend that never loaded one
    for params in (SamplingParams(temperature=0.0, max_tokens=6, logprobs=True),
                   SamplingParams(temperature=1.0, max_tokens=6, logprobs=True)):
        requests = [
            GenerationRequest(chat(p), seed=i, params=params, adapter=adapter if i % 2 else None)
            for i, p in enumerate(PROMPTS)
        ]
        mixed = backend.generate(requests)
        separate = [backend.generate([r])[0] for r in requests]
        assert texts(mixed) == texts(separate)
        assert [g.logprob for g in mixed] == pytest.approx([g.logprob for g in separate], abs=1e-4)
        baseline = plain.generate([requests[0], requests[2]])
        assert texts(baseline) == texts([mixed[0], mixed[2]])
    assert backend.adapters == ["style"]  # loaded once

    # the same name at another path (retrained weights) is reloaded from there
    retrained = AdapterRef("style", str(build_lora_adapter(tiny_model_dir, tmp_path / "retrained", seed=1)))
    again = GenerationRequest(request.messages, request.seed, request.params, adapter=retrained)
    assert abs(backend.sequence_logprob([again], [RESPONSE]).tolist()[0] - adapted_score) > 0.05
    assert backend.adapters == ["style"]

    with pytest.raises(ConfigError, match="neither loaded nor given a path"):
        backend.generate([GenerationRequest(chat("hi"), seed=0, adapter=AdapterRef("missing"))])


def test_soft_prompt_is_prepended_and_differentiable(backend: HFBackend) -> None:
    rng = np.random.default_rng(0)
    soft = SoftPrompt(rng.normal(0.0, 0.5, size=(2, HIDDEN_SIZE)).astype(np.float32))
    params = SamplingParams(temperature=1.0, max_tokens=8, logprobs=True)
    plain = GenerationRequest(chat(PROMPTS[1]), seed=5, params=params)
    prompted = GenerationRequest(plain.messages, plain.seed, params, soft_prompt=soft)

    n = len(RESPONSES)
    scores = backend.sequence_logprob([plain] * n + [prompted] * n, RESPONSES * 2).tolist()
    assert max(abs(a - b) for a, b in zip(scores[:n], scores[n:])) > 0.01  # float noise is ~1e-5
    prompted_score = scores[n]

    mixed = backend.generate_with_ids([plain, prompted])
    assert mixed[1].generation.prompt_tokens == mixed[0].generation.prompt_tokens + 2
    assert [m.generation.text for m in mixed] == [backend.generate([r])[0].text for r in (plain, prompted)]
    ids = [list(mixed[1].completion_ids)]
    assert mixed[1].generation.logprob == pytest.approx(backend.sequence_logprob([prompted], ids).tolist()[0], abs=1e-4)
    assert abs(mixed[1].generation.logprob - backend.sequence_logprob([plain], ids).tolist()[0]) > 0.01

    wrong = GenerationRequest(plain.messages, 0, params, soft_prompt=SoftPrompt(np.zeros((2, HIDDEN_SIZE + 1))))
    with pytest.raises(ConfigError, match="soft prompt"):
        backend.generate([wrong])
    with pytest.raises(ConfigError, match="soft prompt"):
        backend.sequence_logprob([wrong], [RESPONSE])

    embeddings = torch.tensor(soft.embeddings, requires_grad=True)
    trainable = GenerationRequest(plain.messages, 0, params, soft_prompt=SoftPrompt(embeddings))  # type: ignore[arg-type]
    score = backend.sequence_logprob([trainable, plain], [RESPONSE, RESPONSE])
    assert score.tolist()[0] == pytest.approx(prompted_score, abs=1e-4)
    score.sum().backward()
    assert embeddings.grad is not None and float(embeddings.grad.abs().sum()) > 0


def test_added_adapter_trains_through_sequence_logprob(backend: HFBackend) -> None:
    from peft import LoraConfig

    request = GenerationRequest(chat(PROMPTS[0]), seed=0, params=SamplingParams(max_tokens=4))
    before = backend.sequence_logprob([request], [RESPONSE]).tolist()[0]
    backend.add_adapter("policy", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tuned = GenerationRequest(request.messages, 0, request.params, adapter=AdapterRef("policy"))
    assert backend.sequence_logprob([tuned], [RESPONSE]).tolist()[0] == pytest.approx(before, abs=1e-5)  # B starts at 0
    trainable = [p for p in backend.lm.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in backend.lm.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        (-backend.sequence_logprob([tuned], [RESPONSE]).sum()).backward()
        optimizer.step()
    after, untouched = backend.sequence_logprob([tuned, request], [RESPONSE, RESPONSE]).tolist()
    assert after > before + 1.0
    assert untouched == pytest.approx(before, abs=1e-4)  # requests without adapter see the base model


def test_engine_options(tiny_model_dir: Path, catalog) -> None:
    with pytest.raises(ConfigError, match="unknown hf engine option.*temprature"):
        HFBackend(str(tiny_model_dir), temprature=0.5)
    with pytest.raises(ConfigError, match="unknown hf engine option"):
        load_backend(str(tiny_model_dir), catalog, backend="hf", options={"max_model_len": 128})
    with pytest.raises(ConfigError, match="dtype"):
        HFBackend(str(tiny_model_dir), dtype="float8")
    with pytest.raises(ConfigError, match="batch_size"):
        HFBackend(str(tiny_model_dir), batch_size=0)
    with pytest.raises(ConfigError, match="cannot load hf model"):
        HFBackend(str(tiny_model_dir / "missing"))

    built = load_backend(str(tiny_model_dir), catalog, backend="hf")
    assert isinstance(built, HFBackend) and built.model == str(tiny_model_dir) and built.name == "hf"
    assert built.capabilities.trainable and built.capabilities.soft_prompts
    no_think = HFBackend(str(tiny_model_dir), chat_template_kwargs={"enable_thinking": False})
    request = GenerationRequest(chat(PROMPTS[0]), seed=0, params=SamplingParams(temperature=0.0, max_tokens=2))
    assert no_think.generate([request])[0].prompt_tokens > built.generate([request])[0].prompt_tokens
    assert no_think.fingerprint() != built.fingerprint()


def test_a_prefilled_answer_is_continued(backend: HFBackend) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    plain = backend.generate([GenerationRequest(chat("Say something."), seed=0, params=greedy)])[0]
    prefix = plain.text[:3]
    continued = backend.generate([GenerationRequest(chat("Say something."), seed=0, params=greedy, prefill=prefix)])[0]
    assert continued.prompt_tokens > plain.prompt_tokens  # the prefill is part of the prompt
    assert (prefix + continued.text).startswith(plain.text[: len(prefix) + 1])


def test_a_rebuilt_model_in_the_same_folder_gets_a_new_fingerprint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The call cache keys on the fingerprint: the same path with other weights must not hit the old answers."""
    import json
    import shutil

    from apm_bench.backends.base import identified_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    first = identified_model(str(folder))
    assert first.startswith(f"{folder}@") and identified_model(str(folder)) == first
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert identified_model(str(folder)) != first
    (folder / "manifest.json").write_text(json.dumps({"checksum": "abc123"}))  # apm-tiny's: its checksum names it
    assert identified_model(str(folder)) == f"{folder}@abc123"
    assert identified_model("Qwen/Qwen3.5-27B") == "Qwen/Qwen3.5-27B"  # a hub id names its own weights
