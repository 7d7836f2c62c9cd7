"""The Hugging Face ``Trainer`` callback with a tiny random-init GPT-2: clipping, remedies,
reporting to TensorBoard / W&B / MLflow, checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch as gw
from tests import wandb_reader

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gradwatch.integrations.transformers import (  # noqa: E402
    STATE_ATTRIBUTE,
    GradWatchCallback,
    pack_arrays,
    unpack_arrays,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class TinyTokens(torch.utils.data.Dataset):
    """Random token sequences (a language-modelling task on 64 symbols)."""

    def __init__(self, n: int = 64, length: int = 12) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _tiny_gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class SpikyTrainer(transformers.Trainer):
    """Multiplies the loss of one update (1-based, as ``global_step`` after it) by 1e4."""

    spike_at: int | None = None

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * 1e4 if self.state.global_step + 1 == self.spike_at else loss


def _train(
    output: Path,
    callback: GradWatchCallback | None = None,
    *,
    steps: int = 8,
    spike_at: int | None = None,
    resume: Path | None = None,
    **arguments: Any,
) -> Any:
    options: dict[str, Any] = {
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_grad_norm": 0.3,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": 7,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    options.update(arguments)
    args = transformers.TrainingArguments(output_dir=str(output), **options)
    trainer = SpikyTrainer(
        model=_tiny_gpt2(),
        args=args,
        train_dataset=TinyTokens(),
        callbacks=[callback] if callback is not None else None,
    )
    trainer.spike_at = spike_at
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def _logged_grad_norms(trainer: Any) -> dict[int, float]:
    return {e["step"]: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}


def _totals(watch: gw.GradWatch) -> dict[int, float]:
    history = watch.history()
    squares = sum(history[name].astype("float64") ** 2 for name in watch.layer_names)
    return dict(zip(history["step"].tolist(), (squares**0.5).tolist(), strict=True))


# ---------------------------------------------------------------------- clipping


@pytest.mark.parametrize(
    "arguments",
    [{}, {"gradient_accumulation_steps": 2}, {"bf16": True, "max_grad_norm": 0.5}],
    ids=["plain", "accumulation", "bf16"],
)
def test_records_unclipped_norms_and_the_clipping_still_happens_exactly(
    tmp_path: Path, arguments: dict[str, Any]
) -> None:
    baseline = _train(tmp_path / "base", **arguments)
    callback = GradWatchCallback(detectors=())
    watched = _train(tmp_path / "watched", callback, **arguments)

    logged = _logged_grad_norms(watched)
    assert logged == _logged_grad_norms(baseline)  # the Trainer still measures the same norm
    max_norm = arguments.get("max_grad_norm", 0.3)
    assert max(logged.values()) > max_norm  # so clipping really happened
    assert callback.records_unclipped is True
    assert _totals(callback.watch) == pytest.approx(logged, rel=1e-5)  # unclipped, HF's steps
    for before, after in zip(baseline.model.parameters(), watched.model.parameters(), strict=True):
        assert torch.equal(before, after)  # the user's clipping, exactly
    assert watched.args.max_grad_norm == max_norm  # put back


def test_without_max_grad_norm_nothing_is_clipped(tmp_path: Path) -> None:
    baseline = _train(tmp_path / "base", max_grad_norm=0.0, steps=4)
    callback = GradWatchCallback(detectors=())
    watched = _train(tmp_path / "watched", callback, max_grad_norm=0.0, steps=4)
    assert callback.records_unclipped is True
    assert list(_totals(callback.watch)) == [1, 2, 3, 4]
    for before, after in zip(baseline.model.parameters(), watched.model.parameters(), strict=True):
        assert torch.equal(before, after)


# ---------------------------------------------------------------------- remedies and alerts


def test_lr_backoff_acts_under_the_trainer_and_every_step_is_recorded(tmp_path: Path) -> None:
    backoff = gw.LRBackoff(factor=0.5)
    callback = GradWatchCallback(remedies=[backoff], detectors=_spike_early())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path, callback, steps=24, spike_at=16)

    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert callback.watch.step_count == 25  # steps 1..24
    assert 16 in {a.step for a in callback.alerts}
    scales = dict(zip(callback.watch.history()["step"].tolist(), _lr_scales(callback), strict=True))
    assert scales[15] == 1.0 and scales[16] == pytest.approx(0.5)


def _spike_early() -> list[gw.Detector]:
    """Detectors that see the planted spike (Adam's update barely grows with the gradient, so
    EXPLODING does not fire on it; the default spike warm-up is 20 steps)."""
    return [gw.SpikeDetector(warmup=5), gw.NonFiniteDetector()]


def _lr_scales(callback: GradWatchCallback) -> list[float]:
    return callback.watch.engine.history.host_lr_scale.tolist()


def test_nonfinite_raise_skips_the_update_and_stops_training(tmp_path: Path) -> None:
    class NaNTrainer(SpikyTrainer):
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step + 1 == 3 else loss

    callback = GradWatchCallback(detectors=(), nonfinite="raise")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True, max_grad_norm=1.0,
    )  # fmt: skip
    trainer = NaNTrainer(
        model=_tiny_gpt2(), args=args, train_dataset=TinyTokens(), callbacks=[callback]
    )
    trainer.train()
    assert isinstance(callback.stopped_by, gw.GradientError)
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---------------------------------------------------------------------- reporting


def test_reports_every_step_and_the_alerts_to_the_trainers_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_PROJECT": "gradwatch-test",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # wandb may write debug files under the working directory
    callback = GradWatchCallback(detectors=_spike_early())
    steps = list(range(1, 21))
    _train(
        tmp_path / "out", callback, steps=20, spike_at=15, logging_steps=5,
        report_to=["tensorboard", "wandb", "mlflow"],
    )  # fmt: skip
    path = wandb_reader.run_file(wandb.run)
    wandb.finish()
    alert_steps = {a.step for a in callback.alerts}
    assert 15 in alert_steps

    (run_dir,) = (tmp_path / "out" / "runs").iterdir()  # the Trainer's own TensorBoard run
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("gradwatch/grad_norm_total")] == steps
    assert [e.step for e in events.Scalars("train/grad_norm")] == [5, 10, 15, 20]
    assert "gradwatch/alerts" in events.Tags()["tensors"]

    rows = wandb_reader.history(path)
    assert [r["gradwatch/step"] for r in rows if "gradwatch/grad_norm_total" in r] == steps
    assert {r["gradwatch/step"] for r in rows if "gradwatch/alert_text" in r} == alert_steps
    assert [r["train/global_step"] for r in rows if "train/grad_norm" in r] == [5, 10, 15, 20]

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    history = client.get_metric_history(run.info.run_id, "gradwatch/grad_norm_total")
    assert sorted(m.step for m in history) == steps
    artifacts = client.list_artifacts(run.info.run_id, "gradwatch/alerts")
    assert len(artifacts) == len(callback.alerts)


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("restore_callback_states", [False, True])
def test_resuming_from_a_checkpoint_continues_the_watch(
    tmp_path: Path, restore_callback_states: bool
) -> None:
    arguments = {
        "save_strategy": "steps",
        "save_steps": 6,
        "restore_callback_states_from_checkpoint": restore_callback_states,
    }
    first = GradWatchCallback(remedies=[gw.LRBackoff()])
    _train(tmp_path, first, steps=12, spike_at=5, **arguments)
    checkpoint = tmp_path / "checkpoint-6"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    packed = saved["stateful_callbacks"]["GradWatchCallback"]["attributes"][STATE_ATTRIBUTE]
    assert unpack_arrays(packed)["step"] == 7

    second = GradWatchCallback(remedies=[gw.LRBackoff()])
    trainer = _train(tmp_path, second, steps=12, spike_at=5, resume=checkpoint, **arguments)

    kept = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradWatchCallback)]
    assert kept == [second] and kept[0] is second  # the user's object, remedies and all
    assert second.watch.history()["step"].tolist() == first.watch.history()["step"].tolist()
    assert [(a.step, a.kind) for a in second.alerts] == [(a.step, a.kind) for a in first.alerts]
    assert second.watch.remedies[0].state_dict() == first.watch.remedies[0].state_dict()


def test_checkpointed_state_is_packed_and_unpacks_to_the_same_plain_values() -> None:
    state = {
        "steps": list(range(40)),
        "norms": [[0.5 * i, float("nan"), 2.0**-100] for i in range(40)],  # float32 values
        "precise": [0.1 * i for i in range(20)],  # not exact in float32: kept in float64
        "flags": [True] * 20,
        "short": [1.5, 2.5],
        "name": "x",
    }
    packed = pack_arrays(state)
    assert isinstance(packed["steps"], dict) and isinstance(packed["norms"], dict)
    assert packed["norms"]["dtype"] == "float32" and packed["precise"]["dtype"] == "float64"
    assert packed["flags"] == state["flags"] and packed["short"] == state["short"]
    unpacked = unpack_arrays(json.loads(json.dumps(packed)))
    assert unpacked["steps"] == state["steps"] and unpacked["precise"] == state["precise"]
    assert str(unpacked["norms"]) == str(state["norms"])  # NaN included
    assert packed["steps"]["dtype"] == "int32"
    packed_size, plain_size = (len(json.dumps(v["norms"], indent=2)) for v in (packed, state))
    assert packed_size < plain_size / 2


def test_bad_arguments_raise_at_construction() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradWatchCallback(log_every_n_steps=0)
    with pytest.raises(TypeError, match="sinks"):
        GradWatchCallback(sinks=[object()])
    with pytest.raises(TypeError, match="report"):
        GradWatchCallback(report="wandb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite"):
        GradWatchCallback(nonfinite="stop")
