"""Launched on 2 CPU processes by tests/test_corpus_arrow.py: each rank loads the training data the
way train/dp_lora.py does and prints, as JSON, whether it read the corpus and which files its token
table memory-maps. Arguments: config overrides (`key=value`)."""
import json
import sys

from dpnotes.config import load
from dpnotes.training import setup
from dpnotes.training.config import TrainConfig

reads = []
split_tables = setup.load_split_tables


def counted(*args, **kwargs):
    reads.append(1)
    return split_tables(*args, **kwargs)


setup.load_split_tables = counted
config = load(TrainConfig, None, sys.argv[1:])
accelerator = setup.make_accelerator(config)
data = setup.load_training_data(config, accelerator, config.prompt_format())
print(json.dumps({"rank": accelerator.process_index, "read_corpus": len(reads), "rows": len(data),
                  "files": sorted(f["filename"] for f in data.table.cache_files),
                  "first": data.example(0)}), flush=True)
