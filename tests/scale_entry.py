"""train/dp_lora.py for the multi-process tests, with one test-only switch:

DPNOTES_TEST_KILL_AFTER_STEP=k  hard-exits every rank (os._exit, no cleanup, no final save) as soon
as step k is done and checkpointed: a kill between steps. The next launch resumes from `latest`.
"""
import os
import runpy
import sys
from pathlib import Path

from dpnotes.train.dp.engine import PrivacyEngine

kill_after = os.environ.get("DPNOTES_TEST_KILL_AFTER_STEP")
if kill_after is not None:
    allows = PrivacyEngine.budget_allows_step

    def budget_allows_step(self):
        if self.steps_taken >= int(kill_after):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # rank 0 has written the `latest` pointer by now
            sys.stdout.flush()
            os._exit(17)
        return allows(self)

    PrivacyEngine.budget_allows_step = budget_allows_step

entry = Path(__file__).resolve().parents[1] / "train" / "dp_lora.py"
sys.argv = [str(entry), *sys.argv[1:]]
runpy.run_path(str(entry), run_name="__main__")
