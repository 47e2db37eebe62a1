"""Stage 3, judging: turning a response into a rating, ratings into a reward, rewards into Δ.

The judge contract and its two implementations (the simulator's feature-measuring judge and the
LLM judge on any engine), the sign-balanced reward, the candidates and the feedback oracle built
on their ratings (what methods may learn from), and the judge diagnostics.
"""
