"""Secret randomness: 128-bit keys from OS entropy, independent for sampling and noise; streams of
distinct (step, rank) never repeat; a fixed seed is explicit and labels results not private."""
import numpy as np
import pytest
import torch
from torch import nn

from dpnotes.privacy import randomness
from dpnotes.privacy.engine import NOT_PRIVATE, PrivacyConfig, PrivacyEngine
from dpnotes.privacy.randomness import REPLICATED, SecretKeys, stream


def test_keys_are_128_bit_from_os_entropy_and_independent(monkeypatch):
    calls = []
    real = randomness.secrets.randbits
    monkeypatch.setattr(randomness.secrets, "randbits", lambda bits: calls.append(bits) or real(bits))
    keys = SecretKeys.fresh()
    assert calls == [128, 128]
    assert keys.sampling != keys.noise and keys.private
    assert SecretKeys.fresh() != keys


def test_no_default_seed_and_a_fixed_seed_is_labelled_not_private():
    assert PrivacyConfig().seed is None
    secret = PrivacyEngine(nn.Linear(2, 2), PrivacyConfig(noise_multiplier=1.0), num_units=100)
    assert secret.keys.private and secret.privacy_label is None
    assert secret.summary()["private"] is True
    fixed = PrivacyEngine(nn.Linear(2, 2), PrivacyConfig(noise_multiplier=1.0, seed=3), num_units=100)
    assert fixed.privacy_label == NOT_PRIVATE and fixed.summary()["private"] is False
    assert fixed.keys == SecretKeys.from_seed(3) and fixed.keys.sampling != fixed.keys.noise


def test_64_ranks_by_3000_steps_never_repeat_a_stream():
    """The first 64-bit word of every (step, rank) stream is distinct, and a stream's draws never
    touch the (step, rank) words of the counter (so streams cannot run into each other)."""
    key = SecretKeys.fresh().noise
    first = {int(np.random.Philox(key=key, counter=[0, 0, step, rank]).random_raw())
             for step in range(3000) for rank in range(64)}
    assert len(first) == 3000 * 64
    draws = stream(key, 5, 7)
    draws.standard_normal(100_000)
    assert list(draws.bit_generator.state["state"]["counter"][2:]) == [5, 7]


def test_streams_are_reproducible_and_uncorrelated():
    a = stream(7, 0, 0).standard_normal(2000)
    assert np.array_equal(a, stream(7, 0, 0).standard_normal(2000))
    for other in (stream(7, 0, 1), stream(7, 1, 0), stream(8, 0, 0), stream(7, 0, REPLICATED)):
        assert abs(np.corrcoef(a, other.standard_normal(2000))[0, 1]) < 0.1


def test_resume_restores_the_keys_not_new_ones():
    config = PrivacyConfig(noise_multiplier=1.0)
    first = PrivacyEngine(nn.Linear(2, 2), config, num_units=100)
    resumed = PrivacyEngine(nn.Linear(2, 2), config, num_units=100)
    assert resumed.keys != first.keys
    resumed.load_state_dict(first.state_dict())
    assert resumed.keys == first.keys
    assert torch.equal(resumed.sampler.sample(4), first.sampler.sample(4))
    with pytest.raises(ValueError, match="older dpnotes"):
        resumed.load_state_dict({"sampler": {}, "noise": {}, "accountant": {}})


def test_host_tensors_draw_from_the_philox_stream_itself():
    from dpnotes.privacy.randomness import NormalDraws, gaussian

    draws = NormalDraws(11, 3, 2)
    first, second = draws.like(torch.empty(5)), draws.like(torch.empty(2, 3))
    expected = stream(11, 3, 2)
    assert torch.equal(first, gaussian(expected, (5,))) and torch.equal(second, gaussian(expected, (2, 3)))


def test_device_draws_are_a_function_of_key_step_rank_and_standard_normal():
    """The accelerator path (run here with the CPU's generators): reproducible per (key, step, rank),
    different across ranks and steps, N(0, 1), and seeded by two 64-bit words of the stream."""
    from dpnotes.privacy.randomness import NormalDraws

    cpu = torch.device("cpu")
    a = NormalDraws(11, 3, 2).on_device((200_000,), cpu)
    assert torch.equal(a, NormalDraws(11, 3, 2).on_device((200_000,), cpu))
    for other in (NormalDraws(11, 3, 1), NormalDraws(11, 4, 2), NormalDraws(12, 3, 2)):
        assert abs(float(torch.corrcoef(torch.stack([a, other.on_device((200_000,), cpu)]))[0, 1])) < 0.02
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01
    draws = NormalDraws(11, 3, 2)
    draws.on_device((4,), cpu)
    assert len(draws._devices[cpu]) == 2  # two independently seeded generators: 128 secret bits
    nxt = draws.on_device((4,), cpu)  # later tensors continue the generators, never restart them
    assert not torch.equal(nxt, NormalDraws(11, 3, 2).on_device((4,), cpu))
