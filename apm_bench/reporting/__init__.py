"""Stage 6, reporting: run folders, reports, suites, the leaderboard.

Everything that ends up on disk is written here, from a finished `RunResult` or from run folders
already written.
"""
