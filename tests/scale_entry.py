"""train/dp_lora.py for the multi-process tests, with one test-only switch:

DPNOTES_TEST_KILL_AFTER_STEP=k  hard-exits every rank (os._exit, no cleanup, no final save) as soon
as the checkpoint of step k (or later) is written: a kill between steps. The next launch resumes from `latest`.
(The train loop calls recipe.save_checkpoint, which is what gets wrapped.)
"""
import os
import runpy
import sys
from pathlib import Path

from dpnotes.training import recipe

kill_after = os.environ.get("DPNOTES_TEST_KILL_AFTER_STEP")
if kill_after is not None:
    save = recipe.save_checkpoint

    def save_then_maybe_die(accelerator, model, output_dir, step, config_hash):
        save(accelerator, model, output_dir, step, config_hash)
        if step >= int(kill_after):
            accelerator.wait_for_everyone()  # rank 0 has moved the `latest` pointer by now
            sys.stdout.flush()
            os._exit(17)

    recipe.save_checkpoint = save_then_maybe_die

entry = Path(__file__).resolve().parents[1] / "train" / "dp_lora.py"
sys.argv = [str(entry), *sys.argv[1:]]
runpy.run_path(str(entry), run_name="__main__")
