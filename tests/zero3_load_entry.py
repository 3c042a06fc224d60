"""What each rank holds right after `load_model` under ZeRO-3, before any DeepSpeed engine exists
(tests/test_scale.py launches it on 2 processes):

    accelerate launch --config_file accelerate_configs/zero3_cpu_2proc.yaml tests/zero3_load_entry.py MODEL TIED_MODEL

MODEL is loaded as setup() loads it (LoRA, tiny_test.yaml); TIED_MODEL, whose head is tied to its
embedding, for full fine-tuning (which unties them). Each rank prints one line per model.
"""
import sys
from pathlib import Path

import torch
from deepspeed.runtime.zero import GatheredParameters
from safetensors.torch import load_file

from dpnotes.training.config import load_config
from dpnotes.training.setup import load_model, make_accelerator

model_dir, tied_dir = map(Path, sys.argv[1:3])
CONFIG, SETTINGS = "train/configs/tiny_test.yaml", ["report_to=none", "output_dir=unused"]
config = load_config(CONFIG, [*SETTINGS, f"model={model_dir}"])
accelerator = make_accelerator(config)
rank = accelerator.process_index

model, _ = load_model(config, accelerator)
frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
whole = sum(p.numel() > 0 for p in frozen.values())
share = sum(p.ds_tensor.numel() for p in frozen.values() if hasattr(p, "ds_tensor"))
total = sum(getattr(p, "ds_numel", p.numel()) for p in frozen.values())
checkpoint = load_file(model_dir / "model.safetensors")
with GatheredParameters(list(frozen.values())):  # the values rank 0 copied in, module by module
    same = sum(torch.equal(p, checkpoint[name.removeprefix("base_model.model.").replace(".base_layer", "")])
               for name, p in frozen.items())
print(f"rank {rank}: {whole}/{len(frozen)} frozen tensors whole, {share}/{total} elements here, "
      f"{same} equal to the checkpoint, {next(iter(frozen.values())).dtype}", flush=True)

config = load_config(CONFIG, [*SETTINGS, f"model={tied_dir}", "trainable.full_finetune=true"])
model, _ = load_model(config, accelerator)
head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
with GatheredParameters([embedding]):
    equal = torch.equal(head, embedding)
print(f"rank {rank}: untied head {tuple(head.shape)}, embedding {tuple(embedding.ds_shape)}, equal {equal}", flush=True)
# Leave together: a rank that exits while the other still gathers aborts in gloo's teardown (SIGABRT).
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
