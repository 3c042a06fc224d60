"""Logical DP-SGD steps: sampling rate, noise std σC/B, scaling, budget stop, resume == uninterrupted."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from dpnotes.testing.dp_oracle import clipped_sum_reference, per_example_gradients
from dpnotes.testing.tiny_models import random_batch, tiny_llama
from dpnotes.privacy.accounting import compute_epsilon
from dpnotes.privacy.backends import ReplicatedBackend
from dpnotes.privacy.engine import PrivacyConfig, PrivacyEngine
from dpnotes.privacy.losses import causal_lm_losses
from dpnotes.privacy.randomness import SecretKeys
from dpnotes.privacy.sampling import PoissonSampler, pack_micro_batches

DATA = random_batch(vocab=128, batch=40, seq_len=10, seed=11)


def fetch(indices):
    return {k: v[indices] for k, v in DATA.items()}


def lora_llama():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(tiny_llama(), config)


def trainable(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def test_poisson_sampler_rate_and_empty_batches():
    key = SecretKeys.fresh().sampling
    sampler = PoissonSampler(1000, 0.05, key)
    sizes = torch.tensor([len(sampler.sample(step)) for step in range(400)], dtype=torch.float32)
    assert abs(sizes.mean().item() - 50) < 2
    tiny = PoissonSampler(10, 0.01, key)
    assert any(len(tiny.sample(step)) == 0 for step in range(50))


def test_micro_batches_never_split_a_unit():
    patients = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9, 10]]
    batches = pack_micro_batches([0, 1, 2, 3], patients, max_examples=4)
    assert [b[0] for b in batches] == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    assert [b[1] for b in batches] == [[0, 0, 0, 1], [0, 0], [0, 0, 0, 0, 0]]


def test_noise_std_on_the_update_is_sigma_c_over_expected_batch():
    model = nn.Linear(100, 100)
    config = PrivacyConfig(noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=5, steps=1, seed=0)
    engine = PrivacyEngine(model, config, num_units=50, examples_of_unit=None)
    ReplicatedBackend(model).noise_and_step(engine)  # nothing clipped: the gradient is pure noise
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = 1.3 * 0.7 / 5
    assert noise.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 3 * expected / math.sqrt(noise.numel())


def test_without_noise_the_gradient_is_the_clipped_sum_over_expected_batch():
    model = lora_llama()
    config = PrivacyConfig(noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=8, steps=1, micro_batch_size=3, seed=4)
    engine = PrivacyEngine(model, config, num_units=40)
    engine.step(ReplicatedBackend(model), fetch, causal_lm_losses)
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])

    indices = engine.sampler.sample(0).tolist()
    assert len(indices) > 3  # several micro-batches
    _, reference = clipped_sum_reference(per_example_gradients(model, causal_lm_losses, fetch(indices)), 0.05)
    torch.testing.assert_close(ours, reference / 8, rtol=1e-4, atol=1e-7)


def test_calibrated_run_stops_at_budget_and_reports_epsilon():
    config = PrivacyConfig(target_epsilon=3.0, delta=1e-3, expected_batch_size=4, steps=5, seed=0)
    model = lora_llama()
    engine = PrivacyEngine(model, config, num_units=40)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    backend = ReplicatedBackend(model, optimizer)
    epsilons = []
    while engine.budget_allows_step():
        epsilons.append(engine.step(backend, fetch, causal_lm_losses).epsilon)
    assert len(epsilons) == 5
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] <= 3.0
    assert epsilons[-1] == pytest.approx(3.0, rel=0.01)
    assert epsilons[-1] == pytest.approx(compute_epsilon(engine.noise_multiplier, 0.1, 5, 1e-3), rel=1e-9)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"target_epsilon": 0.0}, "epsilon must be > 0"),
        ({"target_epsilon": -1.0}, "epsilon must be > 0"),
        ({"delta": 0.05}, "not < 1/N"),
        ({"expected_batch_size": 100}, "expected_batch_size"),
    ],
)
def test_bad_privacy_parameters_fail_before_any_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        PrivacyEngine(nn.Linear(2, 2), PrivacyConfig(**overrides), num_units=40)


def run(steps, model, optimizer, engine):
    backend = ReplicatedBackend(model, optimizer)
    for _ in range(steps):
        engine.step(backend, fetch, causal_lm_losses)


def fresh(seed=7):
    torch.manual_seed(0)
    model = lora_llama()
    config = PrivacyConfig(target_epsilon=4.0, delta=1e-3, expected_batch_size=6, steps=6, micro_batch_size=4, seed=seed)
    engine = PrivacyEngine(model, config, num_units=40)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, engine


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    model, optimizer, engine = fresh()
    run(6, model, optimizer, engine)

    first = fresh()
    run(3, *first)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": first[0].state_dict(), "optimizer": first[1].state_dict(), "privacy": first[2].state_dict()}, path)

    resumed_model, resumed_optimizer, resumed_engine = fresh(seed=999)  # a different seed must not matter
    state = torch.load(path, weights_only=False)
    resumed_model.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_engine.load_state_dict(state["privacy"])
    assert resumed_engine.steps_taken == 3
    run(3, resumed_model, resumed_optimizer, resumed_engine)

    torch.testing.assert_close(trainable(resumed_model), trainable(model), rtol=0, atol=0)
    assert resumed_engine.epsilon() == engine.epsilon()
    assert not resumed_engine.budget_allows_step()


def test_patient_unit_engine_clips_per_patient():
    patients = [[0, 1, 2], [3], [4, 5], [6, 7], [8, 9, 10, 11]]
    model = lora_llama()
    config = PrivacyConfig(noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=5, steps=1,
                           micro_batch_size=4, privacy_unit="patient", seed=0)
    engine = PrivacyEngine(model, config, num_units=5, examples_of_unit=patients)  # q = 1: every patient
    engine.step(ReplicatedBackend(model), fetch, causal_lm_losses)
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    owner = torch.tensor([u for u, members in enumerate(patients) for _ in members])
    per_example = per_example_gradients(model, causal_lm_losses, fetch(list(range(12))))
    _, reference = clipped_sum_reference(per_example, 0.05, owner)
    torch.testing.assert_close(ours, reference / 5, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("sigma", [0.0, 0.01])
def test_bf16_sums_and_noise_are_fp32_and_cast_once(mode, sigma):
    """One large and 63 small contributions: a bf16 running sum drops every small one (each is
    under half an ulp of the sum), losing 6 % of the total; the fp32 sum keeps them."""
    from dpnotes.privacy.randomness import gaussian, stream

    rows = torch.cat([torch.ones(1, 4), torch.full((63, 4), 2.0**-10)])
    model = nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    nn.init.zeros_(model.weight)
    config = PrivacyConfig(noise_multiplier=sigma, max_grad_norm=10.0, expected_batch_size=64, steps=1,
                           micro_batch_size=1, clipping=mode, seed=1)
    engine = PrivacyEngine(model, config, num_units=64)  # q = 1: every row, one per micro-batch
    engine.step(ReplicatedBackend(model), lambda i: {"x": rows[i].to(torch.bfloat16)}, lambda m, b: m(b["x"]).sum(dim=1))
    total = rows.sum(dim=0, keepdim=True)
    noise = gaussian(stream(engine.keys.noise, 0), (1, 4)) * sigma * 10.0 if sigma else 0.0
    expected = ((total + noise) / 64).to(torch.bfloat16)
    assert model.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(model.weight.grad, expected, rtol=0, atol=0)


def test_clipping_maths_runs_with_full_fp32_products_whatever_the_model_uses():
    """TF32 on for the model (GPUs) must not reach the norms and clipped sums, nor cuBLAS's 16-bit
    split-K reductions the fp32 accumulation of bf16 operands: the clipper sets the highest fp32
    matmul precision and turns those reductions off while it clips, and restores the caller's
    settings afterwards."""
    from dpnotes.privacy.clipping import PerExampleClipper

    matmul = torch.backends.cuda.matmul
    seen = []
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].register_full_backward_hook(lambda *args: seen.append((
        torch.get_float32_matmul_precision(), matmul.allow_bf16_reduced_precision_reduction,
        matmul.allow_fp16_reduced_precision_reduction)))
    clipper = PerExampleClipper(model, max_grad_norm=1.0)
    before = torch.get_float32_matmul_precision(), matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("high")
    matmul.allow_bf16_reduced_precision_reduction = True
    try:
        with clipper.recording(5):
            losses = model(torch.randn(5, 4)).square().sum(1)
        clipper.backward(losses)
        assert seen and set(seen) == {("highest", False, False)}
        assert torch.get_float32_matmul_precision() == "high"
        assert matmul.allow_bf16_reduced_precision_reduction is True
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.allow_bf16_reduced_precision_reduction = before[1]
