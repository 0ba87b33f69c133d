"""TRL's GRPOTrainer under 2 processes, stock and with alignops, run by tests/test_integration_trl_distributed.py:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/trl_distributed_driver.py --model DIR --out DIR --parallel ddp|fsdp2|zero2|zero3 [--case JSON] [--variants ...]

on CPU with gloo, or with `--device cuda --parallel ddp` on 2 GPUs with nccl (bench/gpu.sh's ddp:trl step);
`--trainer sft` runs SFTTrainer instead, stock and under `use_alignops()`.

Each rank runs three variants in turn from the same saved model and seed: stock `GRPOTrainer`,
`GRPOTrainer` under `use_alignops()`, and `AlignopsGRPOTrainer`. After each step it records the logged
loss and grad norm, every parameter (DTensors gathered with `full_tensor()`), the lm_head weight's
gradient before the optimizer step, and what the lm_head looked like on this rank (a DTensor shard or
a whole tensor). The alignops variants also record the weight their head function received. Rank 0
gathers the ranks' records and writes `result.json` (scalars) and `tensors.pt` (parameters, gradients).

ddp: accelerate's MULTI_CPU (torchrun + `use_cpu=True`), parameters replicated, DDP all-reduce; on GPUs
accelerate's MULTI_GPU (one GPU per rank, nccl).
fsdp2: TRL's own `fsdp`/`fsdp_config` options (version 2) build accelerate's FSDP plugin, and accelerate
shards the model with `fully_shard` as on GPUs: each decoder layer, the embedding, a tail unit of the
final norm and the lm_head, and the root. accelerate 1.16 turns its FSDP mode on only for accelerator
backends: a CPU run stays MULTI_CPU and its prepare() wraps the model in DDP. `_fsdp_on_cpu` makes that
one switch (DistributedType.FSDP when a plugin is given), in this process; nothing else of accelerate's
or TRL's code is changed.
zero2, zero3: TRL's `deepspeed` option (a ZeRO config dict), DeepSpeed's CPU accelerator
(DS_ACCELERATOR=cpu, gloo). accelerate 1.16 picks no process-group backend for DeepSpeed without an
accelerator and counts one process; `_deepspeed_on_cpu` gives it gloo, as it does for a CPU run.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"
PROMPTS = ["ab", "1+2=", "cat ", "zz9", "hello", "7*", "q?", "xyz "]
VARIANTS = ("stock", "use_alignops", "alignops_trainer")
SFT_VARIANTS = ("stock", "use_alignops")


def build_tiny_model(path: str):
    """A saved 2-layer Qwen2 (hidden 32, vocab 42) and its character-level tokenizer (returned), for the TRL
    tests in one process (tests/test_integration_trl.py) and at 2 processes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


# the prompts this rank's reward function saw, per call: the ranks' data shards
SEEN: list[list[str]] = []


def reward(completions, prompts=None, **_):
    SEEN.append(list(prompts))
    # "zz9" always earns the same: its group has equal rewards, so zero advantages
    return [1.0 if p == "zz9" else float(sum(map(ord, c)) % 7) + 0.25 * len(c) for c, p in zip(completions, prompts)]


def _fsdp_on_cpu() -> None:
    """accelerate's AcceleratorState sets DistributedType.FSDP (and keeps the plugin) only on accelerator
    backends; on CPU it stays MULTI_CPU. Make the same switch for a CPU process group given a plugin."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, "_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type   # as accelerate syncs it

    AcceleratorState.__init__ = __init__
    AcceleratorState._fsdp_on_cpu = True


def _deepspeed_on_cpu() -> None:
    """accelerate picks no process-group backend for DeepSpeed on a machine without an accelerator (it then counts
    one process); give it gloo and MULTI_CPU, as it does for a CPU run, before DeepSpeed takes over."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        got_backend, kind = original(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return "gloo", DistributedType.MULTI_CPU
        return got_backend, kind

    PartialState._prepare_backend = _prepare_backend


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if hasattr(t, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _layout(t: torch.Tensor) -> dict:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return {"type": "DTensor", "placements": [str(p) for p in t.placements],
                "local_shape": list(t.to_local().shape), "global_shape": list(t.shape)}
    out = {"type": type(t).__name__, "local_shape": list(t.shape), "global_shape": list(t.shape)}
    if hasattr(t, "ds_tensor"):  # a ZeRO-3 parameter: this rank's partition of it
        out["partition_numel"] = t.ds_tensor.numel()
    return out


def _recorder():
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.logs, self.params, self.head_grads, self.head_layout = [], [], [], []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            from torch.distributed.tensor import DTensor

            head = model.get_output_embeddings().weight
            entry = {"weight": _layout(head), "grad": None if head.grad is None else _layout(head.grad)}
            if head.grad is not None:
                local = head.grad.to_local() if isinstance(head.grad, DTensor) else head.grad
                entry["grad_local_sum"] = local.double().sum().item()
                entry["grad_local_abs_sum"] = local.double().abs().sum().item()
            self.head_layout.append(entry)
            self.head_grads.append(None if head.grad is None else _full(head.grad))

        def on_step_end(self, args, state, control, model=None, **kw):
            self.params.append({k: _full(v) for k, v in model.named_parameters()})

    return Record()


def _recording_function():
    from torch.distributed.tensor import DTensor

    from alignops.integrations import trl as ao_trl

    class Recording(ao_trl.AlignopsChunkedLogProb):
        """alignops's head function, noting the weight it is handed on each call."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []

        def apply(self, hidden, weight, bias, targets, temperature, chunk_size, *rest):
            self.calls.append({"weight_type": "DTensor" if isinstance(weight, DTensor) else type(weight).__name__,
                               "weight_shape": list(weight.shape), "rows": hidden.shape[0],
                               "grad": bool(torch.is_grad_enabled() and weight.requires_grad),
                               "loss_request": self.request is not None,
                               "outputs": list(rest[2]) if len(rest) > 2 else None})
            return super().apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)

    return Recording


def _parallel_settings(parallel: str, device: str) -> dict:
    """The TrainingArguments fields that set up the parallelism (shared by GRPOConfig and SFTConfig)."""
    settings = {"use_cpu": device == "cpu"}
    if parallel == "fsdp2":
        settings.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                                "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    elif parallel in ("zero2", "zero3"):
        # DeepSpeed through TRL's `deepspeed` option; its CPU accelerator (DS_ACCELERATOR=cpu) runs over gloo
        settings.update(use_cpu=False, deepspeed={
            "zero_optimization": {"stage": int(parallel[-1])}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False}, "fp16": {"enabled": False}})
    return settings


def _run_record(trainer, record, fn) -> dict:
    acc = trainer.accelerator
    return {
        "logs": record.logs,
        "params": record.params,
        "head_grads": record.head_grads,
        "head_layout": record.head_layout,
        "calls": None if fn is None else fn.calls,
        "seen_prompts": [list(s) for s in SEEN],
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "distributed_type": acc.distributed_type.value,
        "fsdp2": bool(getattr(acc, "is_fsdp2", False)),
        "model_class": type(trainer.model).__name__,
    }


def run_sft_variant(variant: str, model: str, out: str, parallel: str, case: dict, device: str = "cpu"):
    """SFTTrainer, stock or under use_alignops(): its fused head asks for is_top1 (mean_token_accuracy) too."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignops.integrations import trl as ao_trl

    settings = dict(output_dir=os.path.join(out, "sft-" + variant), per_device_train_batch_size=4, max_steps=3,
                    logging_steps=1, report_to="none", seed=0, learning_rate=0.5, optim="sgd",
                    lr_scheduler_type="constant", save_strategy="no", bf16=False, max_length=16,
                    **_parallel_settings(parallel, device))
    settings.update(case)
    record = _recorder()
    data = datasets.Dataset.from_dict({"text": [p + " " + p[::-1] + " abc" for p in PROMPTS] * 4})
    SEEN.clear()
    trainer = SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model), callbacks=[record])
    fn = None
    if variant == "use_alignops":
        fn = _recording_function()()
        with ao_trl.AlignopsPatch(fn).install():
            trainer.train()
    else:
        trainer.train()
    return _run_record(trainer, record, fn)


def run_variant(variant: str, model: str, out: str, parallel: str, case: dict, device: str = "cpu"):
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignops.integrations import trl as ao_trl

    Recording = _recording_function()
    settings = dict(output_dir=os.path.join(out, variant), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=8, max_steps=3, logging_steps=1, report_to="none", seed=0,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", save_strategy="no",
                    loss_type="dapo", beta=0.0, bf16=False, **_parallel_settings(parallel, device))
    settings.update(case)
    record = _recorder()
    fn = None
    if variant == "alignops_trainer":
        class Trainer(ao_trl.AlignopsGRPOTrainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self._alignops_fn = Recording(self.args.alignops_backend, self.args.alignops_chunk_size)

        trainer_cls, config_cls = Trainer, ao_trl.AlignopsGRPOConfig
    else:
        trainer_cls, config_cls = GRPOTrainer, GRPOConfig
    tok = AutoTokenizer.from_pretrained(model)
    SEEN.clear()
    trainer = trainer_cls(model=model, reward_funcs=reward, args=config_cls(**settings),
                          train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 2}), processing_class=tok,
                          callbacks=[record])
    if variant == "alignops_trainer":
        fn = trainer._alignops_fn
    if variant == "use_alignops":
        fn = Recording()
        with ao_trl.AlignopsPatch(fn).install():
            trainer.train()
    else:
        trainer.train()
    return _run_record(trainer, record, fn)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--parallel", choices=("ddp", "fsdp2", "zero2", "zero3"), required=True)
    parser.add_argument("--case", default="{}", help="GRPOConfig overrides, JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU per rank, nccl (ddp only)")
    parser.add_argument("--trainer", choices=("grpo", "sft"), default="grpo",
                        help="sft: SFTTrainer, variants stock and use_alignops")
    parser.add_argument("--variants", default=None, help="comma-separated (default: all of the trainer's)")
    a = parser.parse_args(argv)
    if a.device == "cuda" and a.parallel != "ddp":
        parser.error("--device cuda runs --parallel ddp only")
    torch.set_num_threads(1)
    if a.parallel == "fsdp2":
        _fsdp_on_cpu()
    elif a.parallel.startswith("zero"):
        _deepspeed_on_cpu()
    import torch.distributed as dist

    case = json.loads(a.case)
    results = {}
    known, run = (SFT_VARIANTS, run_sft_variant) if a.trainer == "sft" else (VARIANTS, run_variant)
    for variant in (a.variants or ",".join(known)).split(","):
        assert variant in known, variant
        results[variant] = run(variant, a.model, a.out, a.parallel, case, a.device)
    want = "nccl" if a.device == "cuda" else "gloo"
    assert dist.is_initialized() and want in dist.get_backend(), f"not a {want} process group: {dist.get_backend()}"
    world = dist.get_world_size()
    # every rank's record (rank 0 writes them; the tensors of rank 0 are the gathered full ones)
    scalars = {v: {k: r[k] for k in r if k not in ("params", "head_grads")} for v, r in results.items()}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, scalars)
    if dist.get_rank() == 0:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump({"world_size": world, "backend": dist.get_backend(), "parallel": a.parallel, "case": case,
                       "ranks": per_rank}, f)
        torch.save({v: {"params": r["params"], "head_grads": r["head_grads"]} for v, r in results.items()},
                   os.path.join(a.out, "tensors.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
