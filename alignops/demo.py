"""`make demo`: the fused logits pass on a realistic shape, against the eager path trainers run.

Until the reference trainer lands this is the main job: token log-probs + entropy, forward and
backward, for N=2048 tokens over a V=32000 vocabulary (fp32 on CPU; N=8192, V=151936 bf16 on a GPU),
fused (alignops) vs eager PyTorch (log_softmax + gather + entropy under autograd) vs
torch.compile of the eager path. Prints time and peak extra memory.
"""

import argparse
import os
import sys
import tempfile

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.bench_token_logprobs import make_case  # noqa: PLC0415
    from bench.harness import machine_description, run_cases  # noqa: PLC0415

    import alignops as ao  # noqa: PLC0415
    from alignops import _backend  # noqa: PLC0415

    device = torch.device(args.device)
    backend = _backend.resolve_backend(None, device)
    print(f"alignops demo on {machine_description()}")
    print(f"backend: {backend} (available here: {ao.available_backends(device)})\n")

    # Correctness first: the fused op against the float64 reference on the same inputs.
    x = torch.randn(64, 32000, device=device) * 3
    y = torch.randint(0, 32000, (64,), device=device)
    logp, ent = ao.token_logprobs(x, y, temperature=0.9, return_entropy=True)
    ref_logp, ref_ent = ao.token_logprobs(x.double(), y, temperature=0.9, return_entropy=True, backend="torch")
    print(f"max |logp - float64 reference| = {(logp.double() - ref_logp).abs().max().item():.2e}, "
          f"max |entropy - reference| = {(ent.double() - ref_ent).abs().max().item():.2e}\n")

    if device.type == "cuda":
        case = make_case(8192, 151936, torch.bfloat16, "cuda")
    else:
        case = make_case(2048, 32000, torch.float32, "cpu")
    print(f"timing {case.name} (median of {args.reps}; peak = memory allocated above the inputs)")
    with tempfile.TemporaryDirectory() as out:
        run_cases("token_logprobs", [case], reps=args.reps, warmup=1, out_dir=out)
        md = [f for f in os.listdir(out) if f.endswith(".md")][0]
        print("\n" + open(os.path.join(out, md)).read())


if __name__ == "__main__":
    main()
