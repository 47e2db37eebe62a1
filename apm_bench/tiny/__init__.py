"""apm-tiny: a small real model trained on the simulator's answers, so real engines (hf, vLLM,
an OpenAI server) give meaningful numbers on a laptop. `build` makes it; `behaviour` reports
what it learned. It sits with the run stage: its corpus is recorded from real runs.
"""
