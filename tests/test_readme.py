"""The README's Python snippets run as written, against a tiny model and data set."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _namespace() -> dict[str, Any]:
    """What the snippets take as given: model, optimizer, loader, loss_fn, x and y."""
    pl = pytest.importorskip("pytorch_lightning")

    class TinyModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.mse_loss(self(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    model = TinyModel()
    dataset = torch.utils.data.TensorDataset(x, y)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "loader": torch.utils.data.DataLoader(dataset, batch_size=16),
        "loss_fn": nn.functional.mse_loss,
        "F": nn.functional,
        "x": x,
        "y": y,
    }


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(snippet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative log directories land in the temporary directory
    for name, value in {
        "MAX_STEPS": "6",
        "ENABLE_PROGRESS_BAR": "0",
        "ENABLE_MODEL_SUMMARY": "0",
        "ENABLE_CHECKPOINTING": "0",
        "ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(f"PL_TRAINER_{name}", value)  # Lightning's own Trainer defaults
    namespace = _namespace()
    exec(compile(snippet, f"README.md snippet:\n{snippet}", "exec"), namespace)
