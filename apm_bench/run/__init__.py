"""Stage 5, the run: one configuration, the engines it needs, and the loop over worlds and methods.

It drives the earlier stages in order (world, fit, generation, judging) and hands a `RunResult`
to reporting; it never formats or writes results itself.
"""
