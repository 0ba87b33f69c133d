"""Every method learning on the built-in task: same SFT base, same budget, same seed.

    python -m bench.learning                       # all presets, 120 s of training each
    python -m bench.learning --methods grpo,dapo --seconds 60
    python -m bench.learning --jobs 2 --seconds 180   # two methods at a time, one torch thread each

Builds the SFT base (runs/base) if missing, trains each preset from it for --seconds of training
time (held-out evaluation is not counted), and writes bench/results/learning.md with held-out
greedy accuracy before/after, the training reward (sampled accuracy at the rollout temperature)
over the first and last 50 steps, steps, time and the final KL/entropy metrics, plus a combined
plot bench/results/learning.png. A method that does not reach +20 points is reported as it is;
a method that stops with an error is reported with the error.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.harness import RESULTS, machine_description


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated presets (default: all)")
    p.add_argument("--seconds", type=float, default=100.0, help="training seconds per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default="runs/base")
    p.add_argument("--eval_every", type=int, default=10**6, help="held-out evaluations (default: before and after)")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods trained at once, each a process with one torch thread (on 2 cores, 2 jobs of one "
                        "thread each train faster than one job of two threads)")
    p.add_argument("--runs", default="runs/learning", help="where each method's run and result.json go")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: write the table from the runs' result.json files")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)

    from alignops.train import checkpoint as ckpt  # noqa: PLC0415
    from alignops.train.config import TrainConfig  # noqa: PLC0415
    from alignops.train.presets import PRESETS  # noqa: PLC0415
    from alignops.train.warmup import sft_warmup  # noqa: PLC0415

    if not ckpt.is_checkpoint(args.base):
        print(f"building the SFT base in {args.base}")
        print(sft_warmup(TrainConfig(progress=False), out_dir=args.base))
    base_info = ckpt.load_json(os.path.join(args.base, "state.json"))
    methods = args.methods.split(",") if args.methods else sorted(PRESETS)
    if not args.collect:
        if args.jobs > 1:
            run_jobs(methods, args)
        else:
            for method in methods:
                train_one(method, args)
    rows, logs = [], {}
    for method in methods:
        path = os.path.join(args.runs, method, "result.json")
        if not os.path.exists(path):
            rows.append({"method": method, "error": f"no result ({path})"})
            continue
        with open(path) as f:
            res = json.load(f)
        if "error" in res:
            rows.append(res)
            continue
        logs[method] = res.pop("log")
        res["written"] = os.path.getmtime(path)
        rows.append(res)
    write(args.out, rows, logs, base_info, args, machine_description())


def train_one(method: str, args) -> dict:
    """Trains one preset from the base and writes <runs>/<method>/result.json (the table's row and the log)."""
    from alignops.train.presets import make_config  # noqa: PLC0415
    from alignops.train.trainer import train  # noqa: PLC0415

    out_dir = os.path.join(args.runs, method)
    cfg = make_config(method, {"init_from": args.base, "time_budget_s": args.seconds, "max_steps": 10**6,
                               "eval_every": args.eval_every, "progress": False, "seed": args.seed,
                               "output_dir": out_dir})
    try:
        res = train(cfg)
    except RuntimeError as e:  # e.g. dynamic sampling's generation cap: reported, not hidden
        row = {"method": method, "error": str(e)}
        print(f"{method:>24}: stopped: {e}")
    else:
        log = res.pop("log")
        steps = [r for r in log if "loss" in r]
        last = steps[-1] if steps else {}
        gain = 100 * (res["accuracy_after"] - res["accuracy_before"])
        acc = lambda rs: 100 * sum(r["accuracy"] for r in rs) / len(rs) if rs else None  # noqa: E731
        trained = [r for r in steps if "accuracy" in r]
        before = next(r for r in log if "eval/accuracy" in r)
        own = {k: [before.get(k), v] for k, v in res["final_eval"].items()
               if k.startswith("eval/") and k not in ("eval/accuracy", f"eval/mean@{cfg.eval_samples}")}
        row = {"method": method, "before": 100 * res["accuracy_before"], "after": 100 * res["accuracy_after"],
               "gain": gain, "s_before": 100 * res["sampled_before"], "s_after": 100 * res["sampled_after"],
               "train_first": acc(trained[:50]), "train_last": acc(trained[-50:]),
               "steps": res["steps"], "train_s": res["seconds"], "own": own, "seed": args.seed,
               "load": round(os.getloadavg()[1], 1),  # 5-minute load average at the end: a busy machine takes fewer steps
               "kl": last.get("kl", last.get("approx_kl")), "entropy": last.get("entropy"), "log": log}
        print(f"{method:>24}: greedy {row['before']:.1f}% -> {row['after']:.1f}% ({gain:+.1f}); mean@4 "
              f"{row['s_before']:.1f}% -> {row['s_after']:.1f}% in {res['steps']} steps, {res['seconds']} s", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(row, f)
    return row


def run_jobs(methods, args):
    """Each method in its own process (one torch thread), `args.jobs` at a time."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(methods), []
    while pending or running:
        while pending and len(running) < args.jobs:
            m = pending.pop(0)
            cmd = [sys.executable, "-m", "bench.learning", "--methods", m, "--seconds", str(args.seconds),
                   "--seed", str(args.seed), "--base", args.base, "--eval_every", str(args.eval_every),
                   "--runs", args.runs, "--out", os.path.join(args.runs, m, "table")]
            running.append(subprocess.Popen(cmd, env=env))
        time.sleep(1)
        running = [r for r in running if r.poll() is None]


# what the tiny model on `add` limits a method to showing (the table's last column)
_DPO_NOTE = ("lr 1e-5: at 1e-4 it collapsed to ~4 % (likelihood displacement: chosen and rejected answers share "
             "most tokens); rpo_alpha 1 (DPO + NLL on the chosen) gave +30.8 in 60 s at 1e-4 (docs/loops/preference.md)")
NOTES: dict[str, str] = {
    "dpo": _DPO_NOTE, "ipo": _DPO_NOTE, "cdpo": _DPO_NOTE, "robust_dpo": _DPO_NOTE,
    "orpo": "its NLL on the policy's own correct answers does most of the work",
    "self_rewarding": "the self-judge stays constant on the tiny model (balanced accuracy 0.5), so its pairs "
                      "prefer a correct answer no more often than chance and DPO on them wears the policy down",
    "raft": "rejection-sampling fine-tuning (reward >= 1): SFT on the policy's own correct answers",
    "dft": "supervised: SFT on the task's expert answers, not RL",
    "iw_sft": "SFT on the policy's own correct samples; one seed cannot separate the weighting's effect",
    "chord_mu": "mu stays 0.9-0.6 over these steps: mostly expert SFT",
    "chord_phi": "",
    "srl": "greedy accuracy is the plain-prompt task; SRL trains step-prompts (its own figure: step similarity)",
    "reflect_retry_reward": "greedy = attempt 1; 150 warm-up steps teach the retry format (2 points of attempt 1 "
                            "lost), after which ~3 % of retries are right and GRPO on them does not raise that in "
                            "the remaining 113 steps",
    "training_free_grpo": "no weight update, so eval/accuracy cannot move; the policy critic cannot write JSON, "
                          "so the library stays empty (docs/loops/training_free.md)",
    "vapo": "lam_alpha 1: the paper's 0.05 clamps lambda to 0 for L <= 20 tokens (one-step TD on a fresh critic); "
            "with it vapo gained +3.9",
    "on_policy_distill": "supervised by a teacher, not a reward: reverse KL to a 256 x 4-layer SFT teacher (own figure) "
                         "at every sampled token; the teacher's SFT (once, cached) is not in the budget",
    "rahf": "Dual at alpha 1 (SCIT's stage 1 and alpha 5 both lose accuracy here: docs/loops/rahf.md)",
}


def fmt_any(x):
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def fmt(x, spec=".1f"):
    return "" if x is None else format(float(x), spec)


def command(args) -> str:
    """The command that trains what the table shows (without --collect)."""
    parts = ["python -m bench.learning"]
    if args.methods:
        parts.append(f"--methods {args.methods}")
    parts.append(f"--seconds {args.seconds:.0f}")
    if args.jobs > 1:
        parts.append(f"--jobs {args.jobs}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if args.runs != "runs/learning":
        parts.append(f"--runs {args.runs}")
    if args.out != RESULTS:
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def later_runs(rows, gap_s: float = 3600.0) -> str:
    """A sentence naming the rows trained more than gap_s after the first (a preset changed and
    was rerun with the same base, budget and seed), or ''."""
    times = {r["method"]: r["written"] for r in rows if "written" in r}
    if not times:
        return ""
    first = min(times.values())
    late = sorted(m for m, t in times.items() if t - first > gap_s)
    return (f" Rows retrained later, from the same base with the same budget and seed, after their presets changed: "
            f"{', '.join(late)}." if late else "")


def table_row(r: dict, note: str | None = None) -> str:
    """One method's line of the table, from its result.json row (`note`: the NOTES entry by default)."""
    note = NOTES.get(r["method"], "") if note is None else note
    if "error" in r:
        return f"| {r['method']} | stopped: {r['error']} ||||||||||||||{note}|\n"
    own = "; ".join(f"{k[5:]} {fmt_any(a)} -> {fmt_any(b)}" for k, (a, b) in sorted(r.get("own", {}).items()))
    return (f"| {r['method']} | {fmt(r['before'])} | {fmt(r['after'])} | {fmt(r['gain'], '+.1f')} | "
            f"{fmt(r['s_before'])} | {fmt(r['s_after'])} | {fmt(r['s_after'] - r['s_before'], '+.1f')} | "
            f"{fmt(r['train_first'])} | {fmt(r['train_last'])} | {r['steps']} | {fmt(r['train_s'])} | "
            f"{fmt(r.get('load'))} | "
            f"{fmt(r['kl'], '.4f')} | {fmt(r['entropy'], '.3f')} | {own} | {note} |\n")


def write(out, rows, logs, base_info, args, machine):
    from alignops.train.warmup import describe  # noqa: PLC0415

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(f"# Learning on the built-in task `add`\n\n{machine}. Command: `{command(args)}`. "
                f"Base (every method's start): {describe(base_info)}, "
                f"{base_info.get('seconds')} s. "
                f"Held-out: the task's fixed 1000 problems, greedy accuracy and mean@4 (4 samples per problem at "
                f"temperature 1, the policy RL optimises; fixed sampling seed); training accuracy = share of "
                f"the step's sampled completions (temperature 1) that are correct, mean over the first and the "
                f"last 50 steps; {args.seconds:.0f} s of training per method (evaluation not counted), seed {args.seed}"
                f"{f', {args.jobs} methods at a time (one torch thread each)' if args.jobs > 1 else ''}."
                f"{later_runs(rows)}\n\n")
        f.write("| method | greedy before | after | gain | mean@4 before | after | gain | training acc. first 50 "
                "steps | last 50 | steps | train s | load | final KL | final entropy | the method's own figures "
                "(before -> after) | note |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(table_row(r))
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from alignops.train.metrics import moving_average  # noqa: PLC0415
    fig, ax = plt.subplots(1, 2, figsize=(13, 9))
    for method, log in logs.items():
        steps = [r for r in log if "accuracy" in r and "loss" in r]
        ax[0].plot([r["time_s"] for r in steps], [100 * a for a in moving_average([r["accuracy"] for r in steps], 50)],
                   lw=1, label=method)
    ax[0].set(xlabel="training seconds", ylabel="training accuracy (%), mean of 50 steps",
              title="sampled accuracy during training (same SFT base)")
    ax[0].legend(fontsize=6, ncol=2)
    done = [r for r in rows if "error" not in r]
    ax[1].barh([r["method"] for r in done], [r["s_after"] - r["s_before"] for r in done], label="mean@4", alpha=0.7)
    ax[1].barh([r["method"] for r in done], [r["gain"] for r in done], label="greedy", alpha=0.5)
    ax[1].axvline(0, color="k", lw=0.5)
    ax[1].set(xlabel="held-out gain (points)", title="held-out accuracy after - before")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learning.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
