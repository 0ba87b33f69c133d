"""verl 0.9.1's FSDP engine at 2 CPU ranks (gloo), stock policy losses against `alignops_<method>`,
run by tests/test_integration_verl_engine.py:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/verl_engine_driver.py --out DIR [--worker] [--fused] [--padded] [--cases vanilla,gspo,...]

What runs is verl's own code for one actor mini-batch. The padded global batch goes through
verl.workers.utils.padding.left_right_2_no_padding, each rank takes its half of the rows (as verl's
dispatch hands each data-parallel rank its chunk), and
verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead, built by its own initialize() (the
HF model loaded from a saved directory, verl's apply_monkey_patch, FSDP2 `fully_shard` over the 2
ranks, its optimizer), runs forward_backward_batch with
functools.partial(verl.workers.utils.losses.ppo_loss, config=ActorConfig) as the loss function, as
verl's ActorRolloutRefWorker binds it. forward_backward_batch all-reduces the mini-batch's token
count into batch_num_tokens, sets dp_size, splits the rank's rows into micro-batches
(prepare_micro_batches) and per micro-batch runs forward_step (prepare_model_inputs, the model,
prepare_model_outputs), ppo_loss (which fills config.global_batch_info and calls the registered
policy loss) and backward; FSDP2 reduce-scatters the gradients (mean over the 2 ranks).
With --worker the engine is built and driven by verl.workers.engine_workers.TrainingWorker (its
__init__ and reset(): EngineRegistry.new, engine.initialize()), and each case is one call of
TrainingWorker.train_mini_batch, as ActorRolloutRefWorker.update_actor makes it: verl's mini-batch
iterator, global_token_num, TrainingWorker.train_batch, the engine's train_batch (zero_grad,
forward_backward_batch, optimizer_step: verl's clip, then the step at lr 0) and verl's metric
aggregation over micro-batches and ranks (loss, grad_norm, pg_loss).

Each case runs twice from the same weights: verl's loss_mode, then `alignops_<method>`. With
--fused two cases run again on verl's use_fused_kernels forward (dense_common's torch backend, the
lm_head weight a Shard(0) DTensor across the ranks), stock, then after
alignops.integrations.verl.install_fused_forward(). Per run this records each micro-batch's loss
and pg_loss metric, the rank's rows and token count, the global_batch_info ppo_loss set, and every
parameter's gradient (read inside the engine's train-mode context, which zeroes them on exit,
DTensor shards gathered with full_tensor()). Rank 0 adds a float64 single-process oracle of the
whole global batch: the same weights in float64, each sequence on its own, verl's stock policy loss
over all 8 rows with dp_size 1 and the mini-batch's counts; its gradient is what the 2 ranks'
averaged gradients must equal. Rank 0 writes result.json and tensors.pt.

What stands between verl 0.9.1's actor and a CPU, each handled here for this process only:
- verl registers accelerator platforms only (cuda, npu, rocm) and falls back to CUDA without one,
  so the engine's device mesh would be "cuda" (torch.cuda.set_device fails on a CPU build).
  install_cpu_platform registers a CPU platform through verl's own extension point
  (PlatformRegistry.register, set_platform): device "cpu", backend gloo, torch.cpu plus the memory
  counters verl's worker logs (0). EngineRegistry has FSDPEngineWithLMHead under "cuda" and "npu"
  only: --worker sets verl's VERL_ENGINE_DEVICE=cuda, which only picks that registry entry.
- HFModelConfig asks for flash_attention_2 unless override_config names another implementation;
  flash-attn is not installed. The packed path (use_remove_padding, verl's default) runs with sdpa,
  which keeps attention to each sequence from the packed position_ids (the float64 oracle, which
  runs each sequence alone, checks that); --padded runs the padded path with eager attention.
- verl's apply_monkey_patch patches trl's AutoModelForCausalLMWithValueHead when trl is importable;
  the trl installed here no longer has it (ImportError). verl is told trl is absent.
- verl.workers.engine_workers imports (through verl.checkpoint_engine and verl.workers.rollout.utils)
  uvicorn and fastapi, the rollout server's packages; where they are not installed, empty modules
  stand in for the import (--worker only; the actor never calls them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N_ROWS, PROMPT, RESPONSE, VOCAB = 8, 3, 6, 61
MICRO = 2   # micro_batch_size_per_gpu: each rank's 4 rows in 2 micro-batches

# (case name, verl loss_mode, alignops method, loss_agg_mode, ActorConfig fields)
CASES = [
    ("vanilla", "vanilla", "ppo", "token-mean", {}),
    ("vanilla-seq-mean", "vanilla", "ppo", "seq-mean-token-mean", {}),
    ("dapo", "vanilla", "dapo", "token-mean", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
    ("dr_grpo", "vanilla", "dr_grpo", "seq-mean-token-sum-norm", {"loss_scale_factor": RESPONSE}),
    ("gspo", "gspo", "gspo-token", "seq-mean-token-mean", {"clip_ratio_low": 0.05, "clip_ratio_high": 0.05}),
    ("cispo", "cispo", "cispo", "token-mean", {"clip_ratio_low": 10.0, "clip_ratio_high": 0.2}),
]
FUSED_CASES = ("vanilla", "gspo")


def install_cpu_platform() -> None:
    """verl 0.9.1 registers only accelerator platforms (cuda, npu, rocm) and falls back to CUDA when
    none is found: its FSDP engine then builds a "cuda" device mesh. verl's documented extension
    point for other devices is a PlatformBase registered with PlatformRegistry and set with
    set_platform; this is that, for the CPU with gloo (no profiler, no IPC, no Ray resources)."""
    import types
    from contextlib import contextmanager

    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform

    # torch.cpu, plus the memory counters verl's workers log (perf/max_memory_*): 0, no accounting here
    device_module = types.ModuleType("cpu_device")
    device_module.__getattr__ = lambda name: getattr(torch.cpu, name)
    for counter in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(device_module, counter, lambda *a, **k: 0)
    device_module.reset_peak_memory_stats = lambda *a, **k: None
    device_module.empty_cache = lambda *a, **k: None
    device_module.mem_get_info = lambda *a, **k: (0, 1)
    device_module.get_device_name = lambda *a, **k: "CPU"   # what verl's flops counter names torch.cpu

    @PlatformRegistry.register(platform="cpu")
    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"

        @property
        def device_module(self):
            return device_module

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CPU_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    set_platform(CPUPlatform())


def stub_rollout_server_imports() -> None:
    """verl.workers.engine_workers imports verl.checkpoint_engine, which imports
    verl.workers.rollout.utils, which imports uvicorn and fastapi at module level for the rollout
    server (verl's rollout extras). The actor's training path never calls them; where they are not
    installed, empty modules stand in for the import."""
    import importlib.util
    import types
    for name in ("uvicorn", "fastapi"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            for attr in {"uvicorn": ("Server", "Config"), "fastapi": ("FastAPI",)}[name]:
                setattr(mod, attr, type(attr, (), {}))   # only subclassed or annotated at import
            sys.modules[name] = mod


def build_tiny_model(path: str, tie: bool) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    Qwen2ForCausalLM(cfg).float().save_pretrained(path)


def global_batch():
    """The mini-batch as verl's trainer holds it before dispatch: left-padded prompts, right-padded
    responses, old log-probs near the model's (ratios cross the clip bounds), token advantages."""
    g = torch.Generator().manual_seed(1)
    prompt_lens = torch.tensor([1, 3, 2, 3, 1, 2, 3, 2])
    response_lens = torch.tensor([6, 2, 5, 1, 4, 6, 3, 5])
    prompts = torch.randint(1, VOCAB, (N_ROWS, PROMPT), generator=g)
    responses = torch.randint(1, VOCAB, (N_ROWS, RESPONSE), generator=g)
    prompt_mask = torch.arange(PROMPT).flip(0).unsqueeze(0) < prompt_lens.unsqueeze(1)
    response_mask = torch.arange(RESPONSE).unsqueeze(0) < response_lens.unsqueeze(1)
    prompts = prompts * prompt_mask
    responses = responses * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    old = -torch.log(torch.tensor(float(VOCAB))) + 0.3 * torch.randn(N_ROWS, RESPONSE, generator=g)
    adv = torch.randn(N_ROWS, RESPONSE, generator=g)
    return {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask.long(),
            "old_log_probs": old * response_mask, "advantages": adv * response_mask}


def rank_batch(full, rank, world, remove_padding=False):
    """This rank's rows, converted by verl's left_right_2_no_padding, with the fields verl's
    trainer and TrainingWorker.train_batch attach."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding
    rows = slice(rank * N_ROWS // world, (rank + 1) * N_ROWS // world)
    td = TensorDict({k: v[rows].clone() for k, v in full.items()}, batch_size=[N_ROWS // world])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, global_batch_size=N_ROWS, temperature=1.0, use_remove_padding=remove_padding,
                         use_dynamic_bsz=False, micro_batch_size_per_gpu=MICRO, max_token_len_per_gpu=None,
                         calculate_entropy=False, use_fused_kernels=False)
    return td, rows


def actor_config(verl_name, method, mode, fields, alignops):
    from tests.test_integration_verl import actor_config as base, agg_as_given
    from verl.workers.config import PolicyLossConfig
    policy = agg_as_given(method, mode, "alignops_" + method) if alignops else PolicyLossConfig(loss_mode=verl_name)
    return base(mode, policy_loss=policy, **fields)


def build_engine(model_dir, fused, strategy, remove_padding=False, attn="eager", worker=False):
    # verl's apply_monkey_patch patches trl's AutoModelForCausalLMWithValueHead.state_dict when trl
    # is importable; the trl installed here no longer has that class (ImportError). The actor never
    # uses it: verl is told trl is absent, for this process.
    import verl.models.transformers.monkey_patch as mp
    mp.is_trl_available = lambda: False
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    model_config = HFModelConfig(path=model_dir, load_tokenizer=False, use_remove_padding=remove_padding,
                                 override_config={"attn_implementation": attn},
                                 enable_gradient_checkpointing=False, use_fused_kernels=fused,
                                 fused_kernel_options={"impl_backend": "torch"})
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine_config = FSDPEngineConfig(strategy=strategy, mixed_precision=fp32, use_torch_compile=False, seed=0)
    # lr 0 keeps the weights for the next case; the clip bound is far above any gradient norm here, so
    # verl's clip multiplies by exactly 1 (the worker path reads the gradients at the optimizer step)
    optim_config = FSDPOptimizerConfig(lr=0.0, clip_grad=1e9)
    from verl.trainer.config import CheckpointConfig as Ckpt
    if worker:
        stub_rollout_server_imports()
        from verl.workers.config import TrainingWorkerConfig
        from verl.workers.engine_workers import TrainingWorker
        # verl registers FSDPEngineWithLMHead for the "cuda" and "npu" keys; VERL_ENGINE_DEVICE is
        # verl's own override of the key EngineRegistry looks up (the engine runs on the platform's cpu)
        os.environ["VERL_ENGINE_DEVICE"] = "cuda"
        w = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model_config,
                                                engine_config=engine_config, optimizer_config=optim_config,
                                                checkpoint_config=Ckpt()))
        w.reset()
        assert type(w.engine) is FSDPEngineWithLMHead
        return w
    engine = FSDPEngineWithLMHead(model_config=model_config, engine_config=engine_config,
                                  optimizer_config=optim_config, checkpoint_config=Ckpt())
    engine.initialize()
    return engine


def run_case(engine, full, rank, world, cfg, fused, remove_padding=False):
    """One mini-batch. `engine` an FSDPEngineWithLMHead: its forward_backward_batch inside its
    train-mode context (gradients read there: the context zeroes them on exit). A TrainingWorker:
    its train_mini_batch, as ActorRolloutRefWorker.update_actor calls it (verl's mini-batch
    iterator, global_token_num, train_batch, the engine's train_batch with optimizer_step), the
    gradients read by a hook at the optimizer step, after verl's clip."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss
    td, rows = rank_batch(full, rank, world, remove_padding)
    tu.assign_non_tensor(td, use_fused_kernels=fused)
    loss_fn = partial(ppo_loss, config=cfg)

    def read(module):
        return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                for name, p in module.named_parameters()}

    grads, steps = {}, []
    worker = engine if hasattr(engine, "train_mini_batch") else None
    engine = worker.engine if worker else engine
    forward_step = engine.forward_step
    engine.forward_step = lambda *a, **k: steps.append(1) or forward_step(*a, **k)   # counts micro-batches
    try:
        if worker:
            worker.set_loss_fn(loss_fn)
            tu.assign_non_tensor(td, mini_batch_size=N_ROWS, epochs=1, seed=0, dataloader_kwargs={"shuffle": False})
            hook = engine.optimizer.register_step_pre_hook(lambda opt, a, k: grads.update(read(engine.module)))
            try:
                metrics = tu.get(worker.train_mini_batch(td), "metrics")
            finally:
                hook.remove()
            # verl's metrics for the mini-batch, aggregated over micro-batches and ranks
            rec = {"loss": float(metrics["loss"][0]), "grad_norm": float(metrics["grad_norm"][0]),
                   "pg_loss": float(metrics["actor/pg_loss"][0]),
                   "clipfrac": [float(v) for v in metrics.get("actor/pg_clipfrac", [])]}
        else:
            engine.optimizer_zero_grad()
            with engine.train_mode():
                out = engine.forward_backward_batch(td, loss_fn, forward_only=False)
                grads = read(engine.module)
            # per micro-batch
            clip = out["metrics"].get("actor/pg_clipfrac")   # alignops_cispo does not report it
            rec = {"losses": [float(x) for x in out["loss"]],
                   "pg_loss": [float(v) for v in out["metrics"]["actor/pg_loss"].values],
                   "clipfrac": [float(v) for v in clip.values] if clip is not None else []}
    finally:
        del engine.forward_step
    import verl.utils.experimental.torch_functional as tf
    params = dict(engine.module.named_parameters())
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])   # tied: one parameter
    local = head.to_local() if hasattr(head, "to_local") else head
    return {**rec, "mode": "worker" if worker else "engine", "rows": list(range(rows.start, rows.stop)),
            "head_param": type(head).__name__, "head_local_shape": list(local.shape),
            "head_placements": repr(getattr(head, "placements", None)),
            "forward": type(getattr(engine.module, "module", engine.module)).forward.__name__,
            "fused_class": f"{tf.FusedLinearForPPO.__module__}.{tf.FusedLinearForPPO.__name__}",
            "local_tokens": int(td["loss_mask"].sum()), "input_ids_sum": int(td["input_ids"].values().sum()),
            "micro_batches": len(steps),
            "gbi": {k: (v.item() if torch.is_tensor(v) else v) for k, v in cfg.global_batch_info.items()}}, grads


def oracle(model_dir, full, verl_name, mode, fields, keep=None):
    """float64, one process, the whole global batch: each sequence through the model on its own,
    verl's stock loss over all rows with the mini-batch's counts. `keep` (rows) drops the other
    rows' terms but keeps the counts: the gradient of a run that lost those rows' contribution."""
    from transformers import Qwen2ForCausalLM
    from verl.trainer.ppo import core_algos
    from tests.test_integration_verl import actor_config as base
    from verl.workers.config import PolicyLossConfig
    model = Qwen2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
    model.zero_grad()
    rows_logp = []
    am = full["attention_mask"].bool()
    for i in range(N_ROWS):
        ids = full["input_ids"][i][am[i]].unsqueeze(0)
        # the decoder and lm_head called directly: verl's fused-kernel patch replaces the causal
        # LM class's forward in this process
        hidden = model.model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0)).last_hidden_state
        lp = model.lm_head(hidden)[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        p = int(am[i, :PROMPT].sum())
        r = int(full["response_mask"][i].sum())
        rows_logp.append(lp[p - 1:p - 1 + r])
    mask = full["response_mask"].bool()
    loss_mask = mask.clone()
    if keep is not None:
        loss_mask[[i for i in range(N_ROWS) if i not in keep]] = False
    logp = torch.stack([torch.cat([x, x.new_zeros(RESPONSE - x.shape[0])]) for x in rows_logp])
    cfg = base(mode, policy_loss=PolicyLossConfig(loss_mode=verl_name), **fields)
    cfg.global_batch_info.update({"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": N_ROWS,
                                  "loss_scale_factor": cfg.loss_scale_factor})
    loss, _ = core_algos.get_policy_loss_fn(verl_name)(full["old_log_probs"].double(), logp,
                                                        full["advantages"].double(), loss_mask, mode, cfg, None)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--strategy", default="fsdp2")
    ap.add_argument("--fused-strategy", default="fsdp2")
    ap.add_argument("--untied-fused", action="store_true", help="the fused engine on the untied model (fails in verl)")
    ap.add_argument("--padded", action="store_true",
                    help="use_remove_padding=False: padded rows and an attention mask (eager attention)")
    ap.add_argument("--worker", action="store_true", help="through verl's TrainingWorker.train_mini_batch")
    ap.add_argument("--attn", default=None, help="attn_implementation (sdpa packed, eager padded)")
    args = ap.parse_args()
    args.remove_padding = not args.padded
    args.attn = args.attn or ("eager" if args.padded else "sdpa")
    install_cpu_platform()
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # the fused engine's model ties lm_head to the embedding: with an untied head, verl's FSDP2 wrap
    # shards lm_head as its own unit, and verl's fused forward reads self.lm_head.weight without
    # calling lm_head, so the weight reaches the matmul still a sharded DTensor (verl's own torch
    # backend fails: "aten.mm.default got mixed torch.Tensor and DTensor"). Tied, the weight belongs
    # to the root unit, unsharded for the model's forward and its gradient reduce-scattered after.
    model_dirs = {False: os.path.join(args.out, "model"), True: os.path.join(args.out, "model_tied")}
    if rank == 0:
        for tie, path in model_dirs.items():
            build_tiny_model(path, tie)
    dist.barrier()

    import alignops.integrations.verl as aov
    aov.register()
    full = global_batch()
    wanted = args.cases.split(",")
    result = {"world": world, "use_remove_padding": args.remove_padding, "attn_implementation": args.attn,
              "cases": {}}
    tensors = {}
    for fused in (False, True) if args.fused else (False,):
        # the fused engine patches the HF model class's forward (verl's apply_monkey_patch): the
        # plain cases run first, on their own engine
        model_dir = model_dirs[fused and not args.untied_fused]
        engine = build_engine(model_dir, fused, args.fused_strategy if fused else args.strategy,
                              args.remove_padding, args.attn, args.worker)
        for name, verl_name, method, mode, fields in CASES:
            if name not in wanted or (fused and name not in FUSED_CASES):
                continue
            key = name + ("+fused" if fused else "")
            rec = {}
            for variant in ("stock", "alignops"):
                cfg = actor_config(verl_name, method, mode, fields, variant == "alignops")
                if fused and variant == "alignops":
                    aov.install_fused_forward()
                try:
                    r, grads = run_case(engine, full, rank, world, cfg, fused, args.remove_padding)
                finally:
                    if fused and variant == "alignops":
                        aov.uninstall_fused_forward()
                gathered = [None] * world
                dist.all_gather_object(gathered, r)
                rec[variant] = gathered
                tensors[(key, variant)] = grads
            if rank == 0:
                loss64, grads64 = oracle(model_dir, full, verl_name, mode, fields)
                rec["oracle_loss"] = loss64
                rec["oracle_grad_norm"] = float(torch.sqrt(sum((g * g).sum() for g in grads64.values())))
                tensors[(key, "oracle")] = grads64
                if name == "vanilla" and not fused:
                    # the negative control: rank 1's rows contribute nothing
                    tensors[(key, "oracle_rank0_rows")] = oracle(model_dir, full, verl_name, mode, fields,
                                                                 keep=range(N_ROWS // world))[1]
            result["cases"][key] = rec
    if rank == 0:
        torch.save(tensors, os.path.join(args.out, "tensors.pt"))
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
