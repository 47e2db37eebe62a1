"""Stage 1, the world: what the benchmark is about, fixed before any method runs.

Catalogs (principles, attributes, personas), the hidden mapping C, users with their targets and the
split, neutral prompts, the texts every stage writes into a context, and each user's history.
Nothing here imports another stage: a world can be built and inspected without any engine.
"""
