"""What each integration's switch changes, on the fused lm_head's benchmark shape: the framework's
own function against the same call with alignops switched on, forward and backward, one run.

    python -m bench.bench_integrations           # CPU: N=4096 H=1024 V=32000 fp32 (about 10 minutes)
    python -m bench.bench_integrations --quick   # CPU: N=512 H=256 V=8192 (a smoke run)

trl/stock         trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, W, None, labels, 0.9,
                  _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy")): what
                  GRPOTrainer's fused lm_head calls for the policy (trl 1.16.0).
trl/alignops      the same call inside alignops.integrations.trl.use_alignops().
verl/stock        verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend="torch")
                  (hidden, W, labels, 0.9) -> (log_probs, entropy): verl's fused forward off CUDA
                  (verl 0.9.1; its Triton linear_cross_entropy needs CUDA tensors).
verl/alignops     alignops.integrations.verl.AlignopsFusedLinearForPPO, the same contract.
openrlhf/stock    OpenRLHF 0.11.2's Actor path: logits = hidden @ W.T (its model's lm_head), then
                  log_probs_from_logits(logits, labels, 0.9) + compute_entropy(logits)
                  (openrlhf/models/utils.py, loaded on its own: the package import needs deepspeed
                  and flash-attn). Both OpenRLHF rows hold the [N, V] logits.
openrlhf/alignops the same logits into alignops.integrations.openrlhf's log_probs_from_logits +
                  compute_entropy (the fused pass; the lm_head stays OpenRLHF's).

Every implementation returns (log-probs, entropy); the loss is their sum. Peak = memory above the
inputs, gradients included (dweight is V * H * 4 bytes = 125 MiB here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import types

import torch

from bench.harness import RESULTS, Case, bench_main, machine_name

TEMPERATURE = 0.9


def _openrlhf_utils():
    """OpenRLHF's models/utils.py from the installed distribution, loaded on its own. It imports
    deepspeed at the top for helpers these two functions never call: an empty module stands in
    while it loads."""
    path = importlib.metadata.distribution("openrlhf").locate_file("openrlhf/models/utils.py")
    stand_in = "deepspeed" not in sys.modules
    if stand_in:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        spec = importlib.util.spec_from_file_location("_bench_openrlhf_utils", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if stand_in:
            sys.modules.pop("deepspeed", None)
    return module


def _peers(note):
    """{impl: fn(hidden, weight, labels, logits) -> (logp, entropy)} for every framework that imports."""
    impls = {}
    try:
        import trl.trainer.utils as trl_utils  # noqa: PLC0415

        from alignops.integrations.trl import use_alignops  # noqa: PLC0415

        def trl_call(h, w, y):
            out = trl_utils._ChunkedLogProbFunction.apply(h, w, None, y, TEMPERATURE,
                                                          trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                          ("log_probs", "entropy"))
            return out[0], out[1]

        def trl_alignops(h, w, y):
            with use_alignops():  # the autograd graph keeps alignops's function after the patch ends
                return trl_call(h, w, y)

        impls["trl/stock"] = lambda x: trl_call(x["hidden"], x["weight"], x["labels"])
        impls["trl/alignops"] = lambda x: trl_alignops(x["hidden"], x["weight"], x["labels"])
    except Exception as e:  # noqa: BLE001 - a framework that does not import is reported, not fatal
        note(f"trl not run: {type(e).__name__}: {e}")
    try:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: PLC0415

        from alignops.integrations.verl import AlignopsFusedLinearForPPO  # noqa: PLC0415

        stock, ours = FusedLinearForPPO(impl_backend="torch"), AlignopsFusedLinearForPPO()
        impls["verl/stock"] = lambda x: stock(x["hidden"], x["weight"], x["labels"], TEMPERATURE)
        impls["verl/alignops"] = lambda x: ours(x["hidden"], x["weight"], x["labels"], TEMPERATURE)
    except Exception as e:  # noqa: BLE001
        note(f"verl not run: {type(e).__name__}: {e}")
    try:
        theirs = _openrlhf_utils()
        from alignops.integrations import openrlhf as ours_orl  # noqa: PLC0415

        def actor_path(mod, x):
            logits = x["hidden"] @ x["weight"].t()
            return mod.log_probs_from_logits(logits, x["labels"], TEMPERATURE), mod.compute_entropy(logits)

        impls["openrlhf/stock"] = lambda x: actor_path(theirs, x)
        impls["openrlhf/alignops"] = lambda x: actor_path(ours_orl, x)
    except Exception as e:  # noqa: BLE001
        note(f"openrlhf not run: {type(e).__name__}: {e}")
    return impls


def cases_for(device: str, quick: bool = False):
    n, h, v = (512, 256, 8192) if quick else (4096, 1024, 32000)
    notes = []
    impls = _peers(notes.append)
    for line in notes:
        print(line)
    cache = {}

    def make_inputs():
        if not cache:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(n, h, generator=g).to(device)
            weight = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device)
            cache.update(hidden=hidden, weight=weight, labels=torch.randint(0, v, (n,), generator=g).to(device))
        return dict(cache)

    name = f"N={n} H={h} V={v} float32"
    return [Case(name, {"N": n, "H": h, "V": v, "dtype": "float32", "device": device}, make_inputs, impls,
                 grad_inputs=("hidden", "weight"), warmup=0 if quick else 1, reps=1 if quick else 3)]


def summary(rows: list[dict]) -> list[str]:
    """One line per framework, ISA level and mode: stock / alignops time and the two peaks."""
    by = {(r.get("isa"), r["mode"], r["impl"]): r for r in rows}
    lines = ["| framework | isa | mode | stock ms | alignops ms | speed-up | stock peak MiB | alignops peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for (isa, mode, impl), r in by.items():
        fw, _, kind = impl.partition("/")
        ours = by.get((isa, mode, f"{fw}/alignops"))
        if kind != "stock" or ours is None:
            continue
        lines.append(f"| {fw} | {isa} | {mode} | {r['ms']:.0f} | {ours['ms']:.0f} | {r['ms'] / ours['ms']:.2f}x | "
                     f"{r['peak_extra_MiB']:.0f} | {ours['peak_extra_MiB']:.0f} |")
    return lines


def main(argv=None):
    rows = bench_main("integrations", __doc__, cases_for, argv, reps=3, baseline="trl/stock")
    if rows and "--rows-to" not in (sys.argv[1:] if argv is None else argv):
        path = os.path.join(RESULTS, f"integrations-{machine_name()}.md")
        with open(path, "a") as f:
            f.write("\n## Stock against alignops, per framework\n\n" + "\n".join(summary(rows)) + "\n")
        print("\n".join(summary(rows)))
    return rows


if __name__ == "__main__":
    main()
