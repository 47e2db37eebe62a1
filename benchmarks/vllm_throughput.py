"""`make bench-vllm`: apm-bench's overhead on real vLLM engines, as ratios against raw vLLM.

One batch of generation requests (chat prompts, seeded sampling) and one of judge requests
(rating prompts decoded under a structured-output choice of "1".."10") go through three paths on
one tiny local model (vLLM's CPU build here; the same script runs on CUDA):

- raw: `vllm.LLM.chat` with the same messages and sampling parameters (what a vLLM user writes:
  vLLM renders the chat template and tokenizes);
- engine: `vllm.LLM.generate` on token ids rendered before the clock starts (the engine alone, a
  stricter bound no path that starts from chat messages can reach on a tiny model, where
  tokenizing a prompt costs about as much as computing it);
- backend: apm-bench's `VLLMBackend` on the same engine (chat template, tokenization, sampling
  translation and result conversion included);
- http: apm-bench's `OpenAIBackend` against `python -m vllm.entrypoints.openai.api_server`.

Each path runs `--repeats` times after one warm-up; the median tokens/s counts. Ratios are
backend/raw, backend/engine and http/raw. Goals: ≥ 0.90 offline, ≥ 0.80 over HTTP. Writes the
`vllm` entry of results/bench.json (other entries are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny random-weight model the tests build

GOALS = {"backend_vs_raw": 0.90, "http_vs_raw": 0.80}
ENGINE = {"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_bytes": 1024 * 2**20, "enforce_eager": True,
          "enable_chunked_prefill": False, "enable_prefix_caching": True}


def build_requests(count: int, max_tokens: int) -> tuple[list[Any], list[Any]]:
    """Generation requests on the packaged prompts, and judge requests rating made-up responses."""
    from apm_bench.backends.base import GenerationRequest, SamplingParams, chat
    from apm_bench.judging.llm_judge import SCORE_CHOICES, judge_messages
    from apm_bench.world.catalog import load_catalog
    from apm_bench.world.prompts import load_prompts

    prompts = [p.text for p in load_prompts(None)]
    principles = load_catalog().default_pool().principles
    generation = [GenerationRequest(chat(prompts[i % len(prompts)]), seed=i,
                                    params=SamplingParams(temperature=1.0, max_tokens=max_tokens))
                  for i in range(count)]
    judging = [GenerationRequest(judge_messages(principles[i % len(principles)], prompts[i % len(prompts)],
                                                prompts[(i * 7 + 3) % len(prompts)]),
                                 seed=i, params=SamplingParams(temperature=0.0, max_tokens=2, choices=SCORE_CHOICES))
               for i in range(count)]
    return generation, judging


def timed(run: Callable[[], Sequence[Any]], count_tokens: Callable[[Sequence[Any]], int], repeats: int) -> dict[str, float]:
    """Median seconds and tokens/s over `repeats` calls, after a warm-up call."""
    run()
    seconds, tokens = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = run()
        seconds.append(time.perf_counter() - started)
        tokens.append(count_tokens(outputs))
    median = statistics.median(seconds)
    return {"seconds": round(median, 4), "tokens": int(statistics.median(tokens)),
            "tokens_per_second": round(statistics.median(t / s for t, s in zip(tokens, seconds)), 1)}


def offline_paths(model: Path, batches: dict[str, list[Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Raw vLLM and apm-bench's backend on one engine, so both see the same engine state."""
    import vllm

    from apm_bench.backends.vllm import VLLMBackend, conversation, import_vllm, render_prompt_ids, template_kwargs

    llm = vllm.LLM(model=str(model), **ENGINE)
    backend = VLLMBackend.with_engine(str(model), llm, import_vllm())
    tokenizer = llm.get_tokenizer()
    results: dict[str, dict[str, Any]] = {}
    for kind, requests in batches.items():
        prompts = [{"prompt_token_ids": render_prompt_ids(tokenizer, r.messages, template_kwargs(r, {}))} for r in requests]
        params = [backend._sampling_params(r) for r in requests]

        chats = [conversation(r.messages) for r in requests]

        def engine() -> list[Any]:
            return llm.generate(prompts, params, use_tqdm=False)

        def raw() -> list[Any]:
            return llm.chat(chats, params, use_tqdm=False)

        def generated(outputs: Sequence[Any]) -> int:
            return sum(len(o.outputs[0].token_ids) for o in outputs)

        results[kind] = {
            "raw": timed(raw, generated, repeats),
            "engine": timed(engine, generated, repeats),
            "backend": timed(lambda: backend.generate(requests), lambda gens: sum(g.completion_tokens for g in gens),
                             repeats),
        }
    llm.llm_engine.engine_core.shutdown()
    return results


def http_path(model: Path, batches: dict[str, list[Any]], repeats: int, concurrency: int) -> dict[str, dict[str, Any]]:
    from local_server import free_port, start, stop, wait_until_serving

    from apm_bench.backends.openai_compat import OpenAIBackend

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", str(ENGINE["max_model_len"]),
               "--enforce-eager", "--no-enable-chunked-prefill"]
    log = Path(tempfile.mkdtemp(prefix="apm-bench-server-")) / "server.log"
    server = start(command, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(url, server, log, timeout=300)
        client = OpenAIBackend(str(model), base_url=url, max_concurrency=concurrency, structured_outputs=True)
        return {kind: {"http": timed(lambda: client.generate(requests), lambda gens: sum(g.completion_tokens for g in gens),
                                     repeats)} for kind, requests in batches.items()}
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=256, help="HTTP requests in flight (all of a batch by default)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".apm-cache" / "vllm"))
    from tiny_lm import VLLM_SHAPE, build_tiny_model

    model = build_tiny_model(Path(tempfile.mkdtemp(prefix="apm-bench-vllm-")) / "model", seed=0, **VLLM_SHAPE)
    generation, judging = build_requests(args.requests, args.max_tokens)
    batches = {"generation": generation, "judging": judging}
    paths = offline_paths(model, batches, args.repeats)
    for kind, entry in http_path(model, batches, args.repeats, args.concurrency).items():
        paths[kind].update(entry)
    ratios = {kind: {f"{path}_vs_{bound}": round(e[path]["tokens_per_second"] / e[bound]["tokens_per_second"], 3)
                     for path, bound in (("backend", "raw"), ("backend", "engine"), ("http", "raw"))}
              for kind, e in paths.items()}
    for kind, entry in paths.items():
        for path, figures in entry.items():
            print(f"{kind:10s} {path:8s} {figures['tokens_per_second']:10.1f} tokens/s  ({figures['seconds']:.3f} s)")
        print(f"{kind:10s} ratios   {ratios[kind]}")
    record_path = ROOT / "results" / "bench.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["vllm"] = {"requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats,
                      "http_concurrency": args.concurrency, "model": "tiny random-weight Llama (tests/tiny_lm.py)",
                      "engine": {k: v for k, v in ENGINE.items()}, "paths": paths, "ratios": ratios, "goals": GOALS}
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print("wrote the vllm entry of results/bench.json")


if __name__ == "__main__":
    main()
