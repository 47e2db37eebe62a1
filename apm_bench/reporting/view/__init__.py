"""`apm view`: runs, run lists and the leaderboard as static pages that open offline."""
