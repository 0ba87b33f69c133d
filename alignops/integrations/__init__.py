"""alignops inside the trainers users already run: TRL (`alignops.integrations.trl`), verl
(`alignops.integrations.verl`) and OpenRLHF (`alignops.integrations.openrlhf`).

Each module imports its framework only when imported itself; `import alignops` imports none.
"""
