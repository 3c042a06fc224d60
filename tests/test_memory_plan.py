"""The memory planner against known numbers (parameter counts of published models, LoRA sizes,
ZeRO partitioning arithmetic) and the shape of its recommendations."""
from dataclasses import replace

import pytest

from dpnotes.training.memory_plan import GiB, PRESETS, RunShape, estimate, plan, trainable_params


@pytest.mark.parametrize(
    "name, params",
    [("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-70b", 68_976_648_192),
     ("smollm2-135m", 134_515_008), ("llama3-8b", 8_030_261_248)],
)
def test_parameter_counts_match_published_models(name, params):
    assert PRESETS[name].params == params


def test_lora_trainable_counts_match_peft():
    # PEFT prints 4,194,304 trainable for LLaMA-7B, r=8 on q_proj,v_proj
    run = RunShape(lora_rank=8, lora_targets=("q_proj", "v_proj"))
    assert trainable_params(PRESETS["llama-7b"], run) == 4_194_304
    # GQA: k/v project to 8 heads × 128 = 1024 in LLaMA-70B
    run70 = RunShape(lora_rank=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert trainable_params(PRESETS["llama-70b"], run70) == 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024))


def test_zero_partitioning_arithmetic_full_finetune_7b():
    model, p = PRESETS["llama-7b"], PRESETS["llama-7b"].params
    base = RunShape(lora_rank=None, gpus=8)
    ddp, z1, z2, z3 = (estimate(model, replace(base, zero=s)) for s in (0, 1, 2, 3))
    assert ddp["weights"] == 2 * p and ddp["grads"] == 2 * p and ddp["optimizer"] == 12 * p  # 16 bytes/param
    assert z1["optimizer"] == 12 * p / 8 and z1["grads"] == 2 * p
    assert z2["grads"] == 2 * p / 8 and z2["weights"] == 2 * p
    assert z3["weights"] == 2 * p / 8
    assert ddp["total"] > z1["total"] > z2["total"] > z3["total"]
    off = estimate(model, replace(base, zero=3, offload=True))
    assert off["weights"] == 0 and off["optimizer"] == 0


def test_norm_pass_terms():
    model = PRESETS["llama-7b"]
    lora = RunShape(seq=2048, micro_batch=1, lora_rank=16, zero=3)
    est = estimate(model, lora)
    # the backprops of one layer at a time: a lora_B (d_out = 4096 wide), bf16; nothing kept under ZeRO
    backprops = 2048 * 4096 * 2
    transient = 4096 * 16 * 4  # per-example gradient of a LoRA factor beats 2·T² Gram matrices
    assert est["dp_norm_pass"] == backprops + transient
    # book-keeping on the DDP path keeps each LoRA factor's per-example gradient (4096·16 fp32), not
    # its inputs and backprops (2048·4112 bf16)
    ddp = estimate(model, replace(lora, zero=0, clipping="bk"))
    assert ddp["dp_norm_pass"] == backprops + 32 * 4 * 2 * 4096 * 16 * 4 + transient
    full = estimate(model, replace(lora, lora_rank=None))
    assert full["dp_norm_pass"] >= 2 * 2048 * 2048 * 4  # ghost Gram matrices for 4096×11008 layers


def test_recommendations():
    seven_lora = plan(PRESETS["llama-7b"], RunShape(lora_rank=16))
    assert [row["choice"] for row in seven_lora] == ["DDP-style", "DDP-style", "DDP-style"]
    seventy_full = {row["topology"]: row["choice"] for row in plan(PRESETS["llama-70b"], RunShape(lora_rank=None, seq=1024))}
    assert seventy_full["1x80GB"] is None
    seventy_lora = {row["topology"]: row["choice"] for row in plan(PRESETS["llama-70b"], RunShape(lora_rank=16, seq=1024))}
    assert seventy_lora["8x80GB"] == "ZeRO-3"
    assert estimate(PRESETS["llama-70b"], RunShape(lora_rank=16, seq=1024, zero=3))["total"] < 72 * GiB


def test_the_train_command_plans_any_model_from_its_settings(capsys):
    from dpnotes.training.cli import main

    main(["--dry-run", "model=llama-70b", "max_length=2048", "dtype=bfloat16", "privacy.micro_batch_size=1",
          "trainable.lora_rank=16", "--gpus", "8"])
    out = capsys.readouterr().out
    assert out.startswith("llama-70b: 68.98B params, LoRA r=16") and "breakdown at ZeRO-3 on 8 GPU(s)" in out


def test_the_plan_is_for_the_card_it_is_given():
    # LLaMA-70B LoRA at 2048 tokens: ~84 GB per GPU under ZeRO-3 does not fit an 80 GB card, fits an H200's 141.
    run = RunShape(lora_rank=16, seq=2048)
    on_h100 = {row["topology"]: row["choice"] for row in plan(PRESETS["llama-70b"], run, gpu_gb=80)}
    on_h200 = {row["topology"]: row["choice"] for row in plan(PRESETS["llama-70b"], run, gpu_gb=141)}
    assert on_h100["8x80GB"] is None and on_h200["8x141GB"] == "ZeRO-3"


def test_the_train_command_takes_the_card_memory(capsys):
    from dpnotes.training.cli import main

    args = ["--dry-run", "model=llama-70b", "max_length=2048", "dtype=bfloat16", "privacy.micro_batch_size=1",
            "trainable.lora_rank=16"]
    main([*args, "--gpu-memory-gb", "h200"])
    assert "8x141GB           -> ZeRO-3" in capsys.readouterr().out
    main([*args, "--gpu-memory-gb", "40"])
    assert "8x40GB            -> does not fit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--gpu-memory-gb", "h300"])
    assert "h100, h200" in capsys.readouterr().err


def test_the_plan_counts_the_runs_activation_checkpointing(capsys):
    """70B LoRA at 2048 tokens fits 8 × 80 GB under ZeRO-3 once the run checkpoints activations."""
    from dpnotes.training.cli import main

    args = ["--dry-run", "model=llama-70b", "max_length=2048", "dtype=bfloat16", "privacy.micro_batch_size=1",
            "trainable.lora_rank=16"]
    main(args)
    assert "8x80GB            -> does not fit" in capsys.readouterr().out
    main([*args, "activation_checkpointing=true"])
    assert "8x80GB            -> ZeRO-3" in capsys.readouterr().out


def test_loading_counts_what_each_rank_holds_while_the_model_loads():
    model, p = PRESETS["llama-70b"], PRESETS["llama-70b"].params
    run = RunShape(lora_rank=16, seq=1024, zero=3, gpus=8)
    partitioned = estimate(model, run)
    # built partitioned; rank 0 copies the checkpoint in one module at a time, the embedding the largest
    assert partitioned["load"] == 2 * p / 8 + 2 * model.vocab * model.hidden
    assert partitioned["host_load_per_node"] == 2 * p  # rank 0's copy of the checkpoint only
    assert partitioned["total"] < 72 * GiB
    # without zero.Init every rank builds all 70B weights: 1.1 TB of host RAM per node, 140 GB per GPU
    whole = estimate(model, replace(run, zero3_init=False))
    assert whole["load"] == 2 * p and whole["host_load_per_node"] == 8 * 2 * p
    assert whole["total"] > 140e9
    two_nodes = estimate(model, replace(run, zero=2, gpus=16))
    assert two_nodes["host_load_per_node"] == 8 * 2 * p  # ZeRO-1/2 always load whole, per rank
    offloaded = estimate(model, replace(run, offload=True))
    assert offloaded["load"] == 2 * model.vocab * model.hidden  # the partitions went to host RAM
    assert offloaded["host_load_per_node"] == 2 * p + 8 * 2 * p / 8
