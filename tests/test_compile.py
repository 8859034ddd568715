"""torch.compile traces fastlstm.LSTM as one graph: the time loops are torch.library ops with fake implementations,
and the telemetry counters they update never take part in a graph's shape guards (telemetry.PassProbe).

On CPU this runs the reference backend inside the ops; tests/test_gpu.py repeats it with the kernels on a GPU.
"""

import copy
from contextlib import nullcontext

import torch
from torch import nn

import fastlstm

try:
    from support import assert_rel, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_rel, tolerance


def test_fullgraph_compile_matches_eager_outputs_gradients_and_telemetry():
    eager = fastlstm.LSTM(4, 8, num_layers=2, bidirectional=True, proj_size=3)
    compiled_model = fastlstm.LSTM(4, 8, num_layers=2, bidirectional=True, proj_size=3)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(5, 3, 4)
    results = []
    for model, owner in ((eager, eager), (compiled, compiled_model)):
        out, (h_n, c_n) = model(x)
        (out.square().sum() + h_n.sum() + c_n.sum()).backward()
        results.append((out, h_n, c_n, [p.grad for p in owner.parameters()], owner.telemetry.snapshot()))
    (out_e, h_e, c_e, g_e, s_e), (out_c, h_c, c_c, g_c, s_c) = results
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)
    torch.testing.assert_close(c_c, c_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
    for a, b in zip(s_c.layers, s_e.layers):
        assert a.elements == b.elements and a.gate_saturation == b.gate_saturation
        torch.testing.assert_close(torch.from_numpy(a.grad_norm_per_step), torch.from_numpy(b.grad_norm_per_step))


class _Forecaster(nn.Module):
    """A model around an nn.LSTM, converted the way users convert theirs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        y, (_, c) = self.lstm(torch.tanh(self.embed(x)))
        self.lstm_output = y
        return self.head(y) + c.sum()


def test_converted_model_trains_under_fullgraph_dynamic_compile_at_short_and_long_sequences():
    ref = _Forecaster()
    model = fastlstm.convert(copy.deepcopy(ref), backend="reference")
    assert model.lstm.telemetry.passes.device == model.lstm.weight_ih_l0.device  # not left on the meta device
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    # 1100 exceeds the first size of the per-step rows, which then grow. (Inductor compiles a second graph for it,
    # from its own size heuristics; the next test shows that fastlstm's telemetry adds no recompile.)
    for steps in (8, 1100):
        x = torch.randn(2, steps, 3)
        results = []
        for module, owner in ((compiled, model), (ref, ref)):
            owner.zero_grad()
            out = module(x)
            if owner is ref:
                ref.lstm_output.retain_grad()
            out.square().mean().backward()
            results.append((out, [p.grad for p in owner.parameters()]))
        (out_c, grads_c), (out_r, grads_r) = results
        assert_rel(out_c, out_r, tolerance(torch.float32), f"output, T={steps}")
        for got, expected in zip(grads_c, grads_r):
            assert_rel(got, expected, tolerance(torch.float32), f"gradient, T={steps}")
        (layer,) = model.lstm.telemetry.snapshot(reset=True).layers
        assert layer.elements == 2 * steps * 5 and (layer.backward_passes == 1).all()
        assert len(layer.grad_norm_per_step) == steps and (layer.grad_norm_per_step > 0).all()
        # The loss reaches the last step's h only through the output there, so its norm is nn.LSTM's dL/dy_{T-1}.
        last = ref.lstm_output.grad[:, -1].norm()
        assert abs(layer.grad_norm_per_step[-1] - float(last)) <= 1e-5 * float(last)


def test_telemetry_shapes_never_cause_a_recompile():
    """T = 8 equals the width of the per-layer statistics, T = 4 the number of layer-directions, T = 1100 exceeds
    the per-step rows' first size, T = 2 once specialised T - 1 == 1: one graph serves them all. (aot_eager: Inductor
    adds guards of its own on sizes, for its code generation.)"""
    model = fastlstm.LSTM(3, 4, 2, bidirectional=True, backend="reference")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for index, steps in enumerate((8, 4, 1100, 2)):
        with torch.compiler.set_stance("fail_on_recompile") if index else nullcontext():
            out, (_, c) = compiled(torch.randn(steps, 3, 3))
            (out.sum() + c.sum()).backward()
    snapshot = model.telemetry.snapshot()
    assert snapshot.launches == 4 * 4 * 2  # 4 passes, 4 layer-directions, forward and backward
    assert len(snapshot.layers[0].grad_norm_per_step) == 1100


def test_identical_modules_share_one_graph():
    """An ensemble compiled in one process: every member records its own telemetry through one graph (a registry key
    that reached the ops as an integer made each member a recompile, and the ninth a failure under fullgraph)."""
    torch._dynamo.reset()
    x = torch.randn(5, 2, 3)
    members = [fastlstm.LSTM(3, 4, backend="reference") for _ in range(10)]
    for index, member in enumerate(members):
        compiled = torch.compile(member, fullgraph=True, dynamic=True, backend="aot_eager")
        with torch.compiler.set_stance("fail_on_recompile") if index else nullcontext():
            out, (_, c) = compiled(x)
            (out.sum() + c.sum()).backward()
    for member in members:  # each one's counters got its own pass, forward and backward
        assert member.telemetry.snapshot().launches == 2
