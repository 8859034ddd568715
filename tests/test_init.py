"""fastlstm.init: the initialisers change exactly the parameters they document, with the documented statistics,
on torch.nn.LSTM and fastlstm.LSTM alike, and they have the effect they are for (measured with telemetry)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastlstm
import fastlstm.init as finit

CONFIGS = [
    {"num_layers": 1},
    {"num_layers": 2, "bidirectional": True},
    {"num_layers": 2, "proj_size": 5},
]


def _both(config, input_size=6, hidden=12):
    """An nn.LSTM and a fastlstm.LSTM of the same configuration."""
    return [nn.LSTM(input_size, hidden, **config), fastlstm.LSTM(input_size, hidden, backend="reference", **config)]


def _per_direction(lstm, prefix):
    return [getattr(lstm, name) for names in lstm._all_weights for name in names if name.startswith(prefix)]


@pytest.mark.parametrize("config", CONFIGS)
def test_orthogonal_blocks(config):
    for lstm in _both(config):
        finit.orthogonal_(lstm)
        for w in _per_direction(lstm, "weight_hh"):
            for block in w.detach().chunk(4, dim=0):
                small = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
                torch.testing.assert_close(small, torch.eye(small.shape[0]), atol=1e-5, rtol=0)
        for w in _per_direction(lstm, "weight_hr"):
            w = w.detach()
            torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_xavier_bound_and_variance_per_gate_block(config):
    for lstm in _both(config, input_size=40, hidden=48):
        before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
        finit.xavier_(lstm)
        for name, p in lstm.named_parameters():
            if not name.startswith("weight_ih"):
                assert torch.equal(p, before[name]), f"{name} must be left alone"
                continue
            for block in p.detach().chunk(4, dim=0):
                fan_out, fan_in = block.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                assert block.abs().max() <= bound
                # Uniform(-a, a) has variance a²/3 = 2/(fan_in + fan_out).
                assert block.var().item() == pytest.approx(2.0 / (fan_in + fan_out), rel=0.2)


@pytest.mark.parametrize("config", CONFIGS)
def test_forget_bias_sets_the_effective_bias_only(config):
    for lstm in _both(config):
        before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
        finit.forget_bias_(lstm, 1.5)
        hidden = lstm.hidden_size
        for b_ih, b_hh in zip(_per_direction(lstm, "bias_ih"), _per_direction(lstm, "bias_hh")):
            total = (b_ih + b_hh).detach()
            assert torch.all(total[hidden : 2 * hidden] == 1.5)
        for name, p in lstm.named_parameters():
            if name.startswith("bias"):
                keep = torch.cat([p[:hidden], p[2 * hidden :]]).detach()
                old = torch.cat([before[name][:hidden], before[name][2 * hidden :]])
                assert torch.equal(keep, old), f"{name}: gates other than f changed"
            else:
                assert torch.equal(p, before[name])


def test_chrono_biases_follow_tallec_ollivier():
    torch.manual_seed(0)
    max_timescale = 50
    for lstm in _both({"num_layers": 2, "bidirectional": True}, hidden=400):
        finit.chrono_(lstm, max_timescale)
        for b_ih, b_hh in zip(_per_direction(lstm, "bias_ih"), _per_direction(lstm, "bias_hh")):
            b = (b_ih + b_hh).detach()
            i, f, g, o = b.chunk(4)
            assert torch.equal(i, -f)
            assert torch.all(g == 0) and torch.all(o == 0)
            assert f.min() >= 0 and f.max() <= math.log(max_timescale - 1) + 1e-6
            # b_f = log(u), u ~ U(1, T-1): exp(b_f) is uniform on [1, T-1], so its mean is T/2.
            assert torch.exp(f.double()).mean().item() == pytest.approx(max_timescale / 2, rel=0.1)
            assert torch.all(b_hh.detach() == 0)


def test_chrono_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_timescale"):
        finit.chrono_(nn.LSTM(2, 4), 1)
    with pytest.raises(ValueError, match="bias=False"):
        finit.forget_bias_(fastlstm.LSTM(2, 4, bias=False), 1.0)
    with pytest.raises(TypeError, match="LSTM"):
        finit.orthogonal_(nn.Linear(3, 3))


def test_applies_to_every_lstm_inside_a_model_and_returns_it():
    model = nn.Sequential(nn.Linear(3, 3))
    model.a = nn.LSTM(3, 4)
    model.b = fastlstm.LSTM(4, 4, backend="reference")
    assert finit.forget_bias_(model, 2.0) is model
    for lstm in (model.a, model.b):
        assert torch.all((lstm.bias_ih_l0 + lstm.bias_hh_l0)[4:8] == 2.0)
    assert len(finit.find_lstms(model)) == 2


def test_generator_makes_initialisation_reproducible():
    def weights(seed):
        lstm = fastlstm.LSTM(3, 8, backend="reference")
        gen = torch.Generator().manual_seed(seed)
        finit.chrono_(finit.orthogonal_(finit.xavier_(lstm, generator=gen), generator=gen), 20, generator=gen)
        return torch.cat([p.detach().flatten() for p in lstm.parameters()])

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))


def test_same_effect_on_torch_and_fastlstm():
    """Initialising nn.LSTM and fastlstm.LSTM with the same generator state gives the same parameters."""
    ref, fast = _both({"num_layers": 2, "bidirectional": True})
    for lstm in (ref, fast):
        gen = torch.Generator().manual_seed(7)
        finit.xavier_(lstm, generator=gen)
        finit.orthogonal_(lstm, generator=gen)
        finit.chrono_(lstm, 30, generator=gen)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def _gradient_reach(lstm, steps=40):
    """‖∂L/∂h_0‖ / ‖∂L/∂h_{T-1}‖ measured by telemetry, for a loss on the last output only."""
    torch.manual_seed(3)
    x = torch.randn(steps, 8, lstm.input_size)
    out, _ = lstm(x)
    out[-1].pow(2).sum().backward()
    norms = lstm.telemetry.snapshot(reset=True).layers[0].grad_norm_per_step
    return norms[0] / norms[-1]


def test_forget_bias_and_chrono_lengthen_gradient_reach():
    """What the initialisers are for: gradients from the last step reach further back in time."""
    torch.manual_seed(0)
    base = fastlstm.LSTM(4, 16, backend="reference")
    opened = fastlstm.LSTM(4, 16, backend="reference")
    opened.load_state_dict(base.state_dict())
    chrono = fastlstm.LSTM(4, 16, backend="reference")
    chrono.load_state_dict(base.state_dict())
    finit.forget_bias_(opened, 3.0)
    finit.chrono_(chrono, 200)
    default_reach = _gradient_reach(base)
    assert _gradient_reach(opened) > 100 * default_reach
    assert _gradient_reach(chrono) > 100 * default_reach
