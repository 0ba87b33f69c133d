"""`make demo`: the main job on the built-in default, in under 10 minutes on a 2-core CPU.

1. The fused op against the float64 reference on one batch (a correctness line).
2. The SFT warm-up that builds the shared base model (runs/base; reused when present): constant
   learning rate until the held-out greedy accuracy first lies in 30-50 %, so that the base means
   the same on every machine (docs of alignops/train/warmup.py).
3. GRPO from that base with the fused ops for --seconds of training: prints the held-out accuracy
   curve and before/after, writes runs/demo/curves.png.

`--kernels` adds the timing table of the fused logits pass against eager PyTorch and
torch.compile (N=2048, V=32000 fp32 on CPU; N=8192, V=151936 bf16 on a GPU).
"""

import argparse
import os
import tempfile

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernels", action="store_true", help="also time the fused pass against eager and compile")
    p.add_argument("--seconds", type=float, default=120.0, help="training seconds (default 120)")
    p.add_argument("--method", default="grpo", help="the method preset to train (default grpo)")
    args = p.parse_args(argv)
    from alignops.train import require_train_extra  # noqa: PLC0415
    require_train_extra()

    import alignops as ao  # noqa: PLC0415
    from alignops import _backend  # noqa: PLC0415
    from alignops.env import machine_description  # noqa: PLC0415

    device = torch.device(args.device)
    backend = _backend.resolve_backend(None, device)
    print(f"alignops demo on {machine_description()}")
    print(f"backend: {backend} (available here: {ao.available_backends(device)})\n")

    # Correctness first: the fused op against the float64 reference on the same inputs.
    x = torch.randn(64, 32000, device=device) * 3
    y = torch.randint(0, 32000, (64,), device=device)
    logp, ent = ao.token_logprobs(x, y, temperature=0.9, compute_entropy=True)
    ref_logp, ref_ent = ao.token_logprobs(x.double(), y, temperature=0.9, compute_entropy=True, backend="torch")
    print(f"max |logp - float64 reference| = {(logp.double() - ref_logp).abs().max().item():.2e}, "
          f"max |entropy - reference| = {(ent.double() - ref_ent).abs().max().item():.2e}\n")

    if args.kernels:
        kernel_table(device, args.reps)
    train_demo(args.method, args.seconds)


def kernel_table(device, reps):
    try:  # the benchmark harness is part of a checkout (bench/), not of the installed package
        from bench.bench_token_logprobs import make_case  # noqa: PLC0415
        from bench.harness import run_cases  # noqa: PLC0415
    except ImportError as e:
        raise SystemExit(f"--kernels times the fused pass with the benchmark harness in bench/, which is part "
                         f"of a checkout of alignops, not of the installed package: run it from the checkout's "
                         f"root ({e})") from None
    if device.type == "cuda":
        case = make_case(8192, 151936, torch.bfloat16, "cuda")
    else:
        case = make_case(2048, 32000, torch.float32, "cpu")
    print(f"timing {case.name} (median of {reps}; peak = memory allocated above the inputs)")
    with tempfile.TemporaryDirectory() as out:
        run_cases("token_logprobs", [case], reps=reps, warmup=1, out_dir=out)
        md = [f for f in os.listdir(out) if f.endswith(".md")][0]
        print("\n" + open(os.path.join(out, md)).read())


def train_demo(method: str, seconds: float, base: str = "runs/base") -> None:
    from alignops.train import checkpoint as ckpt  # noqa: PLC0415
    from alignops.train.config import TrainConfig  # noqa: PLC0415
    from alignops.train.presets import make_config  # noqa: PLC0415
    from alignops.train.trainer import train  # noqa: PLC0415
    from alignops.train.warmup import describe, sft_warmup  # noqa: PLC0415

    if ckpt.is_checkpoint(base):
        info = ckpt.load_json(f"{base}/state.json")
        print(f"SFT base: reusing {base}: {describe(info)}")
        if "outcome" not in info:
            print(f"  (built by a fixed-step warm-up whose accuracy depends on the CPU: delete {base} to rebuild it)")
    else:
        print(f"SFT warm-up -> {base} (the shared starting policy of every method), until the held-out accuracy "
              f"enters the target band")
        info = sft_warmup(TrainConfig(), out_dir=base)
        print(f"SFT base: {describe(info)} ({info['seconds']} s)")
    cfg = make_config(method, {"init_from": base, "time_budget_s": seconds, "max_steps": 10**6, "eval_every": 100,
                               "output_dir": "runs/demo"})
    print(f"\n{method} from the base for {seconds:.0f} s of training (16 prompts x 8 samples per step, fused ops)")
    res = train(cfg)
    print("\nheld-out accuracy (1000 problems): greedy, and mean@4 = 4 samples per problem at temperature 1")
    for r in res["log"]:
        if "eval/accuracy" in r:
            acc, sampled = 100 * r["eval/accuracy"], 100 * r.get("eval/mean@4", float("nan"))
            print(f"  step {r['step']:>5}  greedy {acc:5.1f}%  mean@4 {sampled:5.1f}%  {'#' * int(sampled / 2)}")
    print(f"\n{method}: greedy {100 * res['accuracy_before']:.1f}% -> {100 * res['accuracy_after']:.1f}%, mean@4 "
          f"{100 * res['sampled_before']:.1f}% -> {100 * res['sampled_after']:.1f}% in {res['steps']} steps, "
          f"{res['seconds']} s of training; curves: runs/demo/curves.png")


if __name__ == "__main__":
    main()
