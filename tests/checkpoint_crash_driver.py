"""Crash driver for tests/test_trainer.py::test_checkpoint_survives_sigkill_at_every_save_step.

    python tests/checkpoint_crash_driver.py SPEC_JSON

SPEC: {"method": str, "overrides": {TrainConfig fields}, "root": dir, "saves": [int, ...]}.
The driver imports everything once and runs no torch computation itself; for each save index s in
"saves" and k = 1, 2, ... it forks a child that trains the micro config into <root>/s<s>-k<k> with
ALIGNOPS_CHECKPOINT_KILL="s:k" (the child SIGKILLs itself right after step k of its s-th
checkpoint save), until a child finishes its run (k past the save's last step). The reward is
completion-length parity (signal in most groups, as the tests' varied_rewards fixture). Prints one
JSON list: per child its directory, the kill point, the terminating signal or exit code and stderr.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> int:
    spec = json.loads(sys.argv[1])
    import matplotlib  # noqa: PLC0415 - preloaded: a child that finishes plots its curves
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401, PLC0415
    import transformers.models.llama.modeling_llama  # noqa: F401, PLC0415 - lazily imported otherwise
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: F401, PLC0415

    from alignops.train import checkpoint as ckpt  # noqa: PLC0415
    from alignops.train.presets import make_config  # noqa: PLC0415
    from alignops.train.tasks import AdditionTask  # noqa: PLC0415
    from alignops.train.trainer import train  # noqa: PLC0415

    AdditionTask.reward = lambda self, problem, completion: float(len(completion) % 2)
    results = []
    for save in spec["saves"]:
        for k in range(1, 100):
            out_dir = os.path.join(spec["root"], f"s{save}-k{k}")
            err = out_dir + ".stderr"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: train until the hook kills it
                code = 1
                try:
                    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 2)
                    os.environ[ckpt.KILL_ENV] = f"{save}:{k}"
                    train(make_config(spec["method"], {**spec["overrides"], "output_dir": out_dir}))
                    code = 0
                except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
                    traceback.print_exc()
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            with open(err) as f:
                stderr = f.read()
            results.append({"dir": out_dir, "save": save, "step": k, "pid": pid,
                            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "stderr": stderr})
            if not os.WIFSIGNALED(status):
                break
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
