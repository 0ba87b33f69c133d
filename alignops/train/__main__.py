"""python -m alignops.train --method grpo [options]      train one method from the SFT base
   python -m alignops.train sft [--sft_target 0.3,0.5]   build the shared SFT base (runs/base)
   python -m alignops.train --list                       list the methods
   torchrun --nproc_per_node N -m alignops.train ...     data-parallel over N ranks (docs/distributed_training.md)

Every method is a preset of the options below; any option overrides the preset. Option names
follow TRL; verl and OpenRLHF names are accepted as aliases (e.g. --clip_ratio_high = --epsilon_high).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from alignops.train import require_train_extra
from alignops.train.config import TrainConfig, add_config_arguments, apply_overrides


def main(argv=None):
    require_train_extra()
    argv = list(sys.argv[1:] if argv is None else argv)
    sft = bool(argv) and argv[0] == "sft"
    if sft:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m alignops.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="grpo", help="the method preset (default: grpo; --list shows all)")
    p.add_argument("--list", action="store_true", help="list the method presets and exit")
    p.add_argument("--seconds", type=float, default=None, help="sft: time cap in seconds (default: none)")
    p.add_argument("--sft_steps", type=int, default=None,
                   help="sft: the step cap (default: sft_warmup's); with --sft_target none, the steps")
    p.add_argument("--sft_target", default=None, metavar="LOW,HIGH",
                   help="sft: stop at the first probe evaluation whose held-out accuracy lies in [LOW, HIGH] "
                        "(default: sft_warmup's 0.3,0.5); none: train --sft_steps steps")
    add_config_arguments(p)
    args = vars(p.parse_args(argv))
    from alignops.train.presets import PRESETS, make_config  # noqa: PLC0415

    if args.pop("list"):
        for name, preset in sorted(PRESETS.items()):
            print(f"{name:>22}  {preset.description}")
        return 0
    method, seconds, sft_steps, sft_target = args.pop("method"), args.pop("seconds"), args.pop("sft_steps"), \
        args.pop("sft_target")
    if not sft and (sft_steps is not None or sft_target is not None):
        p.error("--sft_steps and --sft_target are options of `python -m alignops.train sft`")
    if sft:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            p.error("sft builds the base checkpoint in one process (every rank would write it); "
                    "run `python -m alignops.train sft` without torchrun")
        from alignops.train.warmup import sft_warmup  # noqa: PLC0415
        cfg = apply_overrides(TrainConfig(), args)
        kw = {} if sft_steps is None else {"max_steps": sft_steps}
        if sft_target is not None:
            kw["target_accuracy"] = parse_band(p, sft_target)
        info = sft_warmup(cfg, **kw, time_budget_s=seconds,
                          out_dir=cfg.init_from if cfg.init_from not in (None, "none") else "runs/base")
        print(json.dumps(info))
        return 0
    cfg = make_config(method, args)
    from alignops.train.trainer import train  # noqa: PLC0415
    result = train(cfg)
    log = result.pop("log")
    if int(os.environ.get("RANK", "0")) != 0:  # every rank returns the same result; rank 0 reports it
        return 0 if log else 1
    print(json.dumps(result))
    print(f"held-out accuracy {100 * result['accuracy_before']:.1f}% -> {100 * result['accuracy_after']:.1f}% "
          f"in {result['steps']} steps, {result['seconds']} s; curves: {cfg.resolved_output_dir()}/curves.png")
    return 0 if log else 1


def parse_band(p, text: str):
    if text.strip().lower() == "none":
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        p.error(f"--sft_target must be LOW,HIGH (e.g. 0.3,0.5) or none, got {text!r}")
    return low, high


if __name__ == "__main__":
    sys.exit(main())
