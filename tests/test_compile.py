"""torch.compile traces fastlstm.LSTM as one graph: the time loops are torch.library ops with fake implementations.

On CPU this runs the reference backend inside the ops; tests/test_gpu.py repeats it with the kernels on a GPU.
"""

import torch

import fastlstm


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
