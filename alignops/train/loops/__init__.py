"""Data-loop methods: one module per family, each a DataLoop (base.py) named by its preset in
presets.py. preference.py: DPO, IPO, cDPO, robust DPO, ORPO, Self-Rewarding; sft.py: RAFT, DFT,
iw-SFT; chord.py: CHORD-mu/phi; srl.py: SRL; reflect.py: Reflect, Retry, Reward (both on
format_grpo.py: format warm-up, self-replay, masked GRPO);
training_free.py (+ llm.py): Training-free GRPO; rahf.py: RAHF; distill.py: on-policy distillation."""
