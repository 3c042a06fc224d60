"""DP-SGD under DeepSpeed ZeRO-1/2/3 (see shared docs/dp-under-zero.md for the traps): the
`DeepSpeedBackend` of `PrivacyEngine.step`, which samples, pads and accounts; this module does the
clip and noise parts of the step the way DeepSpeed needs them.

One logical step, on every rank:

1. The logical batch is Poisson-sampled with the shared sampling key (same on every rank) and this rank
   packs its share into micro-batches. Ranks agree on the largest micro-batch count (all-reduce
   MAX) and pad with zero-weight micro-batches: DeepSpeed's collectives (ZeRO-2 gradient
   reduction, ZeRO-3 parameter gathers) need the same number of forwards/backwards everywhere,
   and truncating a sampled batch would break the privacy analysis.
2. Per micro-batch, ONE forward recorded by the clipper and `torch.autograd.grad` w.r.t. the
   recorded layer outputs only (no parameter `.grad`): the rules give per-unit norms, clip
   coefficients c_i and, with book-keeping (`clipping: bk`, the default), the micro-batch's clipped
   sums S_p = Σ_i c_i g_{i,p} from the same activations and backprops. The norm rules read
   activations and backprops only, so they are ZeRO-3-safe.
3. ONE `engine.backward` per micro-batch (never a second backward through the engine):
   - bk: of the surrogate (W / B_exp) · Σ_p <p, S_p>, whose gradient is exactly the clipped sum;
   - ghost: of (W / B_exp) · Σ_i c_i L_i after an engine forward (the norm pass ran through the
     unwrapped module, the RNG rewound so that both forwards draw the same dropout masks): two
     forwards, no per-parameter sums held; the choice for full fine-tuning of large models.
   DeepSpeed averages over the W ranks (and we pass scale_wrt_gas=False), so the reduced gradient
   is Σ_i c_i g_i / B_exp with B_exp = q·N, the global expected batch.
4. `engine.step()`: the base optimizer DeepSpeed drives is a `ZeroNoiseOptimizer`, which adds
   N(0, (σC/B_exp)²) to the gradient of every parameter it is asked to step, from the secret noise
   key's stream of (step, rank), then delegates to the wrapped torch optimizer. Under ZeRO-1/2/3
   that optimizer only ever sees this rank's disjoint fp32 partition, so the noise lands exactly
   once per coordinate with the full std. Streams of distinct (step, rank) never overlap and are
   recomputed from the checkpointed key, so resumed runs draw the same noise as uninterrupted ones
   (see randomness.py).

ZeRO stage 0 (replicated gradients) is refused: use the DDP-style path (no DeepSpeed), whose
replicated noise (one stream, the same on every rank) is the right scheme for replicas.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from dpnotes.errors import UserError
from dpnotes.privacy.clipping import ClipResult
from dpnotes.privacy.engine import LossFn, MicroBatch, PrivacyEngine
from dpnotes.privacy.collectives import all_reduce_max
from dpnotes.privacy.randomness import NormalDraws


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


class ZeroNoiseOptimizer(torch.optim.Optimizer):
    """Wraps the torch optimizer handed to DeepSpeed; adds the DP noise to the gradients of the
    parameters it steps (under ZeRO: this rank's fp32 partition) before delegating `step`.

    Stepping while not armed raises when noise is due, so an update can never go out un-noised.
    DeepSpeed may call `step` several times per engine step (one per param group / ZeRO-3 sub
    group): each call sees different partitions, and draws continue on the same stream.
    """

    # Deliberately not calling Optimizer.__init__: param_groups and state are the base's own.
    def __init__(self, base: torch.optim.Optimizer):
        self.base = base
        self.defaults = base.defaults
        self._draws: NormalDraws | None = None
        self._std = 0.0
        self.noised_elements = 0  # coordinates noised since the last arm() (tests, audits)

    param_groups = property(lambda self: self.base.param_groups, lambda self, v: setattr(self.base, "param_groups", v))
    state = property(lambda self: self.base.state, lambda self, v: setattr(self.base, "state", v))

    def __getattr__(self, name):  # hooks and bookkeeping torch/DeepSpeed may look up
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"ZeroNoiseOptimizer({self.base!r})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def arm(self, std: float, draws: NormalDraws) -> None:
        self._std, self._draws, self.noised_elements = float(std), draws, 0

    def disarm(self) -> None:
        self._std, self._draws = 0.0, None

    @torch.no_grad()
    def step(self, closure=None):
        if self._draws is None:
            raise RuntimeError("ZeroNoiseOptimizer stepped outside a DP step (noise not armed)")
        if self._std > 0:
            for group in self.base.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    param.grad.add_(self._draws.like(param.grad).to(param.grad.dtype), alpha=self._std)
                    self.noised_elements += param.grad.numel()
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.base.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)


def zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def module_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed runs the module in, whatever it was loaded in: its config's bf16 or fp16
    when enabled (the engine casts the module; ZeRO-3's zero.Init builds it so), else fp32."""
    for section, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        if str(ds_config.get(section, {}).get("enabled", False)).lower() == "true":
            return dtype
    return torch.float32


def require_partitioned(model: nn.Module) -> None:
    """ZeRO-3 must have built the model partitioned: from_pretrained does so inside deepspeed.zero.Init
    while the Accelerator's DeepSpeed config is alive (accelerate's zero3_init_flag). Built whole,
    every rank would hold all of it before DeepSpeed partitions it (70B in bf16: 140 GB each)."""
    whole = [name for name, param in model.named_parameters() if not hasattr(param, "ds_id")]
    if whole:
        raise UserError(
            f"ZeRO-3 loaded the model whole on every rank ({len(whole)} tensors, e.g. {whole[0]}): set "
            "zero3_init_flag: true in the accelerate config and create the Accelerator before loading the model"
        )


def whole(params) -> contextlib.AbstractContextManager:
    """`params` whole inside: ZeRO-3 leaves each rank only its partition of a parameter outside
    its module's forward/backward (shape (0,)); any other parameter is whole already."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero import GatheredParameters

    return GatheredParameters(partitioned)


@contextlib.contextmanager
def _same_randomness():
    """Run the norm-pass forward and then rewind the RNG, so the engine forward that follows draws
    the same dropout masks (the norms must be those of the gradients that get back-propagated)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def require_fp32_sums(ds_config: dict) -> None:
    """Have DeepSpeed accumulate and reduce the clipped sums in fp32 (unset: set it). Its defaults
    follow the model's dtype: under bf16 the sums would be rounded to 8 significant bits at every
    accumulation and reduction before the noise, which is drawn for the exact fp32 sum."""
    data_types = ds_config.setdefault("data_types", {})
    accum = data_types.setdefault("grad_accum_dtype", "fp32")
    reduce = ds_config.setdefault("communication_data_type", "fp32")
    if (str(accum).lower(), str(reduce).lower()) != ("fp32", "fp32"):
        raise ValueError(
            f"the DeepSpeed config must accumulate and reduce gradients in fp32 (data_types.grad_accum_dtype "
            f"{accum!r}, communication_data_type {reduce!r}): set both to \"fp32\", the clipped sums are noised as fp32"
        )


class DeepSpeedBackend:
    """Clip and noise of PrivacyEngine.step through a DeepSpeed engine (ZeRO-1/2/3)."""

    def __init__(self, ds_engine, module: nn.Module, optimizer: ZeroNoiseOptimizer, rank: int, world_size: int,
                 stage: int):
        self.ds_engine = ds_engine
        self.stage = stage
        self.module = module  # the unwrapped model, for the norm pass
        self.optimizer = optimizer
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def prepare(cls, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int):
        """Wrap `optimizer` in the noise optimizer and hand both to DeepSpeed through accelerate."""
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = zero_stage(accelerator)
        if stage not in (1, 2, 3):
            raise ValueError(
                f"DP under DeepSpeed needs ZeRO stage 1, 2 or 3 (got {stage}): with replicated gradients use the "
                "DDP-style path (accelerate MULTI_GPU / MULTI_CPU), whose replicated noise is correct for replicas"
            )
        if ds_config.get("optimizer") or ds_config.get("scheduler"):
            raise ValueError("the DeepSpeed config must not define optimizer/scheduler: dpnotes owns the DP step")
        clip = ds_config.get("gradient_clipping", 0)
        if clip not in (0, 0.0, "auto"):
            raise ValueError("set gradient_clipping to 0: per-example DP clipping replaces it")
        ds_config["gradient_clipping"] = 0.0
        require_fp32_sums(ds_config)
        ds_config.setdefault("zero_allow_untested_optimizer", True)
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        if ds_config.get("gradient_accumulation_steps", "auto") == "auto":
            ds_config["gradient_accumulation_steps"] = 1
        if ds_config.get("train_batch_size", "auto") == "auto":
            ds_config["train_batch_size"] = (
                ds_config["train_micro_batch_size_per_gpu"] * ds_config["gradient_accumulation_steps"] * accelerator.num_processes
            )
        noisy = optimizer if isinstance(optimizer, ZeroNoiseOptimizer) else ZeroNoiseOptimizer(optimizer)
        ds_model, _ = accelerator.prepare(model, noisy)
        trainable = [p for p in model.parameters() if p.requires_grad]
        partitioned = sum(1 for p in trainable if hasattr(p, "ds_shape") and p.numel() != p.ds_numel)
        accelerator.print(
            f"DeepSpeed ZeRO-{stage}: {partitioned}/{len(trainable)} trainable tensors partitioned; DP noise added "
            "once per coordinate on each rank's fp32 partition"
        )
        return cls(ds_model, model, noisy, accelerator.process_index, accelerator.num_processes, stage)

    def micro_batch_count(self, local: int) -> int:
        # At least one (zero-weight) pass even for an empty logical batch: the noise step still runs.
        return max(all_reduce_max(local), 1)

    def clip(self, engine: PrivacyEngine, loss_fn: LossFn, micro: MicroBatch) -> tuple[torch.Tensor, ClipResult]:
        self.ds_engine.set_gradient_accumulation_boundary(micro.last)
        if engine.clipper.mode == "bk":
            return self._clip_bookkeeping(engine, loss_fn, micro)
        return self._clip_ghost(engine, loss_fn, micro)

    def _clip_bookkeeping(self, engine: PrivacyEngine, loss_fn: LossFn, micro: MicroBatch):
        """One forward: the clipper's book-keeping gives this micro-batch's clipped sums S_p from the
        activations and backprops it recorded (autograd.grad to the layer outputs, no parameter
        `.grad`); the engine then back-propagates the surrogate Σ_p <p, S_p>, whose gradient is
        exactly S_p, so DeepSpeed reduces, partitions and accumulates the clipped sums itself.

        ZeRO-3 runs that forward through the engine: its forward advances DeepSpeed's micro-step
        count (without it every micro-batch's gradient would overwrite the last one's). ZeRO-1/2
        run it through the unwrapped module: there a backward through the engine forward's graph,
        even autograd.grad to the layer outputs, runs the reduction epilogue (IndexError in
        reduce_ipg_grads), and their accumulation does not depend on the engine forward."""
        clipper = engine.clipper
        clipper.reset_sums()
        with clipper.recording(micro.size):
            losses = loss_fn(self.ds_engine if self.stage == 3 else self.module, micro.batch)
        result = clipper.backward(losses, micro.group_index, verify=self.stage != 3)
        scale = 0.0 if micro.padding else self._reduction_scale(engine)
        params = clipper.parameters
        with whole(params):  # trainable LoRA factors are small; full fine-tuning under ZeRO-3: use ghost
            surrogate = sum((p * s.mul_(scale).to(p.dtype)).sum() for p, s in zip(params, clipper.summed()))
            self.ds_engine.backward(surrogate, scale_wrt_gas=False)
        clipper.reset_sums()
        return losses.detach(), result

    def _clip_ghost(self, engine: PrivacyEngine, loss_fn: LossFn, micro: MicroBatch):
        """Ghost clipping: a norm pass, then the engine's own forward/backward of Σ c_i L_i."""
        ds = self.ds_engine
        # The norm pass is its own forward through the unwrapped module: DeepSpeed 0.19 hooks
        # the engine forward's graph, and any backward through it (even autograd.grad to the
        # layer outputs) runs its reduction epilogue (ZeRO-2: IndexError in reduce_ipg_grads).
        # The RNG is rewound so that both forwards draw the same dropout masks.
        with _same_randomness():
            with engine.clipper.recording(micro.size):
                norm_losses = loss_fn(self.module, micro.batch)
            result = engine.clipper.coefficients(norm_losses, micro.group_index)
        losses = loss_fn(ds, micro.batch)
        group_index = micro.group_index
        coef = result.coefficients if group_index is None else result.coefficients[group_index.to(result.coefficients.device)]
        if micro.padding:
            coef = torch.zeros_like(coef)
        weighted = (losses * coef.to(device=losses.device, dtype=losses.dtype)).sum() * self._reduction_scale(engine)
        ds.backward(weighted, scale_wrt_gas=False)
        return losses.detach(), result

    def _reduction_scale(self, engine: PrivacyEngine) -> float:
        # DeepSpeed averages over the W ranks: W / B_exp times Σ_i c_i g_i reduces to Σ c_i g_i / B_exp.
        return self.world_size / engine.expected_batch_size

    def noise_and_step(self, engine: PrivacyEngine) -> None:
        # Each rank noises its own partition from its own stream of this step, with the std of the
        # noise on each coordinate of the final (averaged) gradient: σC / B_exp.
        std = engine.noise.std / engine.expected_batch_size
        self.optimizer.arm(std, NormalDraws(engine.noise.key, engine.steps_taken, self.rank))
        try:
            self.ds_engine.step()
        finally:
            self.optimizer.disarm()

    # ---- what the training run needs beyond the step ---------------------------------------
    def checkpointed(self) -> list:
        """What accelerate's save_state must checkpoint besides the privacy engine: nothing, the
        DeepSpeed engine checkpoints its weights and optimizer itself."""
        return []

    def save_weights(self, accelerator, folder, full_model: bool = False) -> None:
        """The trained weights (`save_pretrained`: the adapter under LoRA), or with full_model every
        weight under the wrapped model's key names (PEFT: base + adapter, unmerged; gathered to the
        main process under ZeRO-3, stage3_gather_16bit_weights_on_model_save). Collective: call on
        every rank; the main process writes."""
        if full_model and self.stage == 3:
            accelerator.save_model(self.ds_engine, folder)
            return
        if full_model:
            # ZeRO-1/2 keep every weight whole on every rank: the main process writes them as they
            # are (accelerate's save_model would clone the whole model on every rank first).
            if accelerator.is_main_process:
                from huggingface_hub import save_torch_state_dict

                Path(folder).mkdir(parents=True, exist_ok=True)
                save_torch_state_dict(self.module.state_dict(), folder)
            return
        state = self.trainable_state(accelerator.is_main_process)
        if accelerator.is_main_process:
            self.module.save_pretrained(folder, state_dict=state)

    def trainable_state(self, keep: bool) -> dict[str, torch.Tensor]:
        """The trainable weights, on the CPU where `keep` (the main process) and nowhere else. Under
        ZeRO-3 each is gathered alone (at most one whole tensor at a time on each GPU); under ZeRO-1/2
        every rank holds them whole and nothing is gathered. Never the frozen base: a LoRA adapter
        of a 70B model is megabytes, its base 140 GB."""
        from deepspeed.runtime.zero import GatheredParameters

        state = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                with GatheredParameters([param]):  # a no-op for a parameter ZeRO-3 does not partition
                    if keep:
                        state[name] = param.detach().to("cpu", copy=True)
        return state
