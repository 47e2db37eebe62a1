"""The style simulator's parts: style codec, policy, history writer, context reader, summarizer.

Stage 2 (engines) together with `apm_bench.backends`: `backends/sim.py` assembles these into the
`sim` backend. The simulator's judge is a judge, so it lives in `apm_bench.judging.sim_judge`.
"""
