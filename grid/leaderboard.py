"""The honest MER leaderboard (``results/leaderboard/``): one row per model and protocol, every row paired with
``epir`` on the same subjects and seeds, plus one row fixed before any run was made: the ENSEMBLE.

The ensemble row (fixed in advance, commit of this docstring): for each seed k and each sample, the mean of the
honest (last-epoch) softmax probabilities that the CPU-trained leaderboard models' seed-k cells gave it
(:data:`ENSEMBLE_MEMBERS` that ran on that protocol, each with equal weight), and its predicted class is the
arg-max. It is scored and paired like any other row: the same subjects, the same seeds.
"""

from __future__ import annotations

# the CPU-trained models whose probabilities the ensemble averages (those with cells on a protocol take part)
ENSEMBLE_MEMBERS = ("epir", "baseline", "sssnet", "ststnet", "rcn-a")
ENSEMBLE = "ensemble"  # the row's name
