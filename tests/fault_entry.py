"""``python -m disttrain.train`` with a fault injected from outside the framework.

Used as a torchrun entry point by tests/test_reliability.py.  A global
optimizer step hook (torch's own ``register_optimizer_step_post_hook``) sends
SIGKILL or SIGSTOP to this worker at step FAULT_STEP, only on the first
attempt (TORCHELASTIC_RESTART_COUNT=0) and only on rank FAULT_RANK, so the
framework contains no test hooks at all.
"""
import os
import signal

from torch.optim.optimizer import register_optimizer_step_post_hook

if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        and os.environ.get("RANK") == os.environ["FAULT_RANK"]):
    steps = [0]
    fault = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[os.environ["FAULT"]]

    def _inject(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == int(os.environ["FAULT_STEP"]):
            os.kill(os.getpid(), fault)

    register_optimizer_step_post_hook(_inject)

from disttrain.train import main  # noqa: E402

main()
