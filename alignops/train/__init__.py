"""The reference trainer: one readable RL loop that drives every method through alignops' ops.

    python -m alignops.train --method grpo          # see --help
"""
