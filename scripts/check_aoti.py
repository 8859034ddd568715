"""End-to-end check of the AOTInductor path (docs/deploy.md), too slow for the unit suite (about a minute of C++
compilation on a CPU): a model converted to fastlstm is exported, compiled ahead of time into a .pt2 package, loaded
in a fresh process where `import fastlstm` fails, and run at other batch sizes against the nn.LSTM model it came from.

    python scripts/check_aoti.py          # exits non-zero on any failure; CI runs it after the tests
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

import fastlstm
from fastlstm.testing import rel_err, tolerance

CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoFastlstm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastlstm" or name.startswith("fastlstm."):
                raise ImportError("fastlstm is blocked in this process")

    sys.meta_path.insert(0, NoFastlstm())
    import torch

    folder = sys.argv[1]
    model = torch._inductor.aoti_load_package(folder + "/model.pt2")
    outputs = [model(x) for x, _ in torch.load(folder + "/cases.pt")]
    assert "fastlstm" not in sys.modules
    torch.save(outputs, folder + "/outputs.pt")
    """
)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, 2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y)


def main() -> int:
    torch.manual_seed(0)
    ref = Tagger().eval()
    model = fastlstm.convert(copy.deepcopy(ref))
    steps = 6  # torch.export fixes the sequence length of aten.lstm, as it does for nn.LSTM
    program = torch.export.export(model, (torch.randn(2, steps, 3),), dynamic_shapes=({0: Dim("batch")},))
    with tempfile.TemporaryDirectory() as folder:
        torch._inductor.aoti_compile_and_package(program, package_path=str(Path(folder) / "model.pt2"))
        with torch.no_grad():
            cases = [(x, ref(x)) for x in (torch.randn(b, steps, 3) for b in (1, 5, 9))]
        torch.save(cases, Path(folder) / "cases.pt")
        child = subprocess.run([sys.executable, "-c", CHILD, folder], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        outputs = torch.load(Path(folder) / "outputs.pt")
    errors = [rel_err(got, expected) for got, (_, expected) in zip(outputs, cases)]
    print(f"AOTInductor package, loaded without fastlstm: relative errors against nn.LSTM {errors}")
    return 0 if len(errors) == len(cases) and max(errors) <= tolerance(torch.float32) else 1


if __name__ == "__main__":
    sys.exit(main())
