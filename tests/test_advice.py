"""Advice fits the model: what ModelProfile.inspect sees, and what advise recommends (or not)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.advice import advise, merge_advice
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.profile import ModelProfile
from tests import zoo
from tests.tiny_models import tiny_transformers

VANISHING, EXPLODING, SPIKE = AlertKind.VANISHING, AlertKind.EXPLODING, AlertKind.SPIKE


def profile_of(model: nn.Module, **kwargs: object) -> ModelProfile:
    torch.manual_seed(0)
    return ModelProfile.inspect(model, **kwargs)  # type: ignore[arg-type]


class BasicBlock(nn.Module):
    """ResNet-style block: the class name and the ``downsample`` child both mark it residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.downsample(x)


class InplaceSkip(nn.Module):
    """No telling name: only the source (``out += x``) shows the skip connection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        out += x
        return out


class ParallelBranches(nn.Module):
    """Two branches added together: not a skip connection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.left = nn.Linear(width, width)
        self.right = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


def test_sigmoid_mlp_gets_the_classic_vanishing_remedies() -> None:
    advice = advise(VANISHING, profile_of(zoo.deep_mlp(nn.Sigmoid)))
    assert advice == (
        "replace Sigmoid with ReLU/GELU",
        "add BatchNorm/LayerNorm",
        "use He (Kaiming) initialisation",
        "add residual (skip) connections",
    )


def test_zero_gradients_are_explained_and_never_fixed_with_the_learning_rate() -> None:
    relu_mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(relu_mlp.parameters(), lr=0.1)
    advice = advise(AlertKind.ZERO_GRAD, ModelProfile.inspect(relu_mlp, optimizer))
    assert advice[0].startswith("no gradient reaches these layers (exactly zero)")
    assert "replace ReLU with LeakyReLU/GELU (they cannot die)" in advice
    assert not any("learning rate" in item for item in advice)
    after_divergence = gw.Alert(AlertKind.EXPLODING, 3, ("0",), 9.0, 0.3, "warning", "", ())
    pointed = advise(
        AlertKind.ZERO_GRAD, ModelProfile.inspect(relu_mlp, optimizer), earlier=[after_divergence]
    )
    assert pointed[0].startswith("first fix the exploding alert of step 3")


def test_relu_he_batchnorm_mlp_is_not_told_what_it_already_has() -> None:
    profile = profile_of(zoo.relu_he_bn_mlp())
    assert profile.has_norm and profile.he_scaled
    advice = advise(VANISHING, profile)
    joined = " ".join(advice)
    assert "Sigmoid" not in joined and "ReLU/GELU" not in joined
    assert "BatchNorm" not in joined and "He (Kaiming)" not in joined
    assert advice == ("add residual (skip) connections",)  # 20 plain layers: the one thing missing


def test_residual_network_is_not_told_to_add_residual_connections() -> None:
    profile = profile_of(zoo.residual_mlp())
    assert profile.residual
    assert "add residual (skip) connections" not in advise(VANISHING, profile)


def test_plain_rnn_and_lstm_get_different_recurrent_advice() -> None:
    rnn = advise(EXPLODING, profile_of(zoo.SequenceRegressor("RNN")))
    lstm = advise(EXPLODING, profile_of(zoo.SequenceRegressor("LSTM")))
    for item in (
        "clip gradients (gw.ClipNorm / gw.ZClip)",
        "use LSTM/GRU",
        "truncate BPTT (shorter sequences)",
        "orthogonal init of the recurrent matrix (nn.init.orthogonal_)",
    ):
        assert item in rnn
    assert "use LSTM/GRU" not in lstm
    assert not any("orthogonal" in item for item in lstm)
    assert "set the LSTM forget-gate bias to 1" in lstm
    assert "set the LSTM forget-gate bias to 1" not in rnn


def test_orthogonal_recurrent_matrix_with_radius_three_is_told_to_rescale_not_to_reinit() -> None:
    profile = ModelProfile.inspect(zoo.exploding_rnn(radius=3.0))
    assert profile.recurrent_orthogonal
    assert profile.recurrent_radius == pytest.approx(3.0, rel=1e-3)
    advice = advise(EXPLODING, profile)
    assert "rescale the recurrent matrix to spectral radius <= 1 (now 3)" in advice
    assert not any("orthogonal init" in item for item in advice)


def test_lstm_with_forget_bias_one_is_not_told_to_set_it() -> None:
    model = zoo.SequenceRegressor("LSTM", hidden=16)
    with torch.no_grad():
        model.rnn.bias_ih_l0[16:32].fill_(1.0)
        model.rnn.bias_hh_l0[16:32].fill_(0.0)
    profile = ModelProfile.inspect(model)
    assert profile.lstm_forget_bias == pytest.approx(1.0)
    assert "set the LSTM forget-gate bias to 1" not in advise(VANISHING, profile)


def test_divergence_advice_quotes_the_current_learning_rate_and_optimizer() -> None:
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    profile = ModelProfile.inspect(model, optimizer)
    assert advise(SPIKE, profile) == (
        "lower the learning rate (now 0.0003 for Adam)",
        "enable gw.ZClip",
        "enable gw.LRBackoff",
    )
    optimizer.param_groups[0]["lr"] = 1e-2  # a scheduler moved it after inspection
    assert advise(EXPLODING, profile)[0] == "lower the learning rate (now 0.01 for Adam)"


def test_learning_rate_is_not_quoted_without_an_optimizer() -> None:
    advice = advise(SPIKE, profile_of(zoo.deep_mlp(nn.ReLU, depth=3)))
    assert advice == ("lower the learning rate", "enable gw.ZClip")


def test_remedies_already_in_use_are_not_advised() -> None:
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = [gw.ZClip(), gw.SkipStep(), gw.LRBackoff()]
    profile = ModelProfile.inspect(model, optimizer, remedies=remedies)
    assert advise(SPIKE, profile) == ("lower the learning rate (now 0.1 for SGD)",)
    nonfinite = advise(AlertKind.NONFINITE, profile)
    assert not any("SkipStep" in item or "clip" in item for item in nonfinite)
    assert "check the loss for log(0) or division by zero (add an eps)" in nonfinite


def test_nonfinite_advice_with_half_precision_weights_and_with_a_scaler() -> None:
    half = ModelProfile.inspect(zoo.deep_mlp(nn.ReLU, depth=3).half())
    assert half.half_precision
    assert "keep weights in float32 and train with torch.autocast" in advise(
        AlertKind.NONFINITE, half
    )
    scaled = ModelProfile.inspect(zoo.deep_mlp(nn.ReLU, depth=3), scaler=object())
    advice = advise(AlertKind.NONFINITE, scaled)
    assert "autocast to bfloat16 instead of float16" in advice
    assert not any("float32" in item for item in advice)


def test_saturation_advice_names_only_the_activation_types_of_the_alerted_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh())
    profile = ModelProfile.inspect(model)
    assert (
        advise(AlertKind.SATURATION, profile, layers=("1",))[0] == "replace Sigmoid with ReLU/GELU"
    )
    assert advise(AlertKind.SATURATION, profile, layers=("3",))[0] == "replace Tanh with ReLU/GELU"
    assert advise(AlertKind.SATURATION, profile)[0] == "replace Sigmoid/Tanh with ReLU/GELU"


def test_dead_units_advice_depends_on_the_rectifier() -> None:
    relu = advise(AlertKind.DEAD_UNITS, profile_of(zoo.relu_he_bn_mlp(depth=4)))
    gelu = advise(AlertKind.DEAD_UNITS, profile_of(zoo.deep_mlp(nn.GELU, depth=4)))
    assert relu[0] == "replace ReLU with LeakyReLU/GELU"
    assert not any("LeakyReLU" in item for item in gelu)
    assert "use He (Kaiming) initialisation" in gelu  # default init, no normalisation
    assert "use He (Kaiming) initialisation" not in relu


def test_stagnation_advice_suggests_momentum_only_to_plain_sgd() -> None:
    model = zoo.relu_he_bn_mlp(depth=3)
    plain = ModelProfile.inspect(model, torch.optim.SGD(model.parameters(), lr=1e-5))
    heavy = ModelProfile.inspect(model, torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9))
    assert advise(AlertKind.STAGNATION, plain) == (
        "raise the learning rate (now 1e-05 for SGD) or check its schedule",
        "use SGD momentum (0.9) or AdamW",
    )
    assert advise(AlertKind.STAGNATION, heavy) == (
        "raise the learning rate (now 1e-05 for SGD) or check its schedule",
    )


def test_amp_overflow_gets_no_advice() -> None:
    assert advise(AlertKind.AMP_OVERFLOW, profile_of(zoo.deep_mlp(nn.Tanh))) == ()


def test_init_scale_is_measured_against_he_and_xavier() -> None:
    default = profile_of(zoo.deep_mlp(nn.ReLU, depth=6, width=64))
    he = profile_of(zoo.relu_he_bn_mlp(depth=6, width=64))
    xavier = zoo.deep_mlp(nn.Tanh, depth=6, width=64)
    for module in xavier.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
    # PyTorch's default kaiming_uniform_(a=sqrt(5)) has std 1/sqrt(3 fan_in): 1/sqrt(6) of He.
    assert default.he_ratio == pytest.approx(6**-0.5, rel=0.1)
    assert default.he_scaled is False
    assert he.he_ratio == pytest.approx(1.0, rel=0.1) and he.he_scaled
    assert ModelProfile.inspect(xavier).xavier_ratio == pytest.approx(1.0, rel=0.1)


def test_zero_initialised_weights_do_not_count_in_the_init_scale() -> None:
    profile = profile_of(zoo.residual_mlp(depth=4))
    assert profile.init_ratios["1.fc2"] == (0.0, 0.0)
    assert profile.he_ratio is not None and profile.he_ratio > 0.3


@pytest.mark.parametrize(
    ("model", "residual"),
    [
        (zoo.residual_mlp(depth=2), True),  # class name "ResidualBlock"
        (nn.Sequential(BasicBlock(4), BasicBlock(4)), True),  # name and downsample child
        (nn.Sequential(InplaceSkip(4), nn.Linear(4, 1)), True),  # forward source: out += x
        (nn.TransformerEncoderLayer(8, 2, 16), True),  # built-in residual layer
        (nn.Sequential(ParallelBranches(4), nn.Linear(4, 1)), False),
        (zoo.deep_mlp(nn.ReLU, depth=4), False),
        (zoo.small_cnn(), False),
    ],
)
def test_residual_structure_heuristic(model: nn.Module, residual: bool) -> None:
    assert ModelProfile.inspect(model).residual is residual


def test_profile_reads_activations_norms_recurrence_and_depth() -> None:
    profile = ModelProfile.inspect(zoo.small_cnn())
    assert set(profile.activations) == {"ReLU"}
    assert profile.norms == {"BatchNorm2d"} and profile.has_norm
    assert profile.weight_layers == 3 and profile.depth == 5
    assert not profile.recurrent
    rnn = ModelProfile.inspect(zoo.SequenceRegressor("GRU"))
    assert rnn.recurrent == {"GRU"} and not rnn.plain_rnn


# ------------------------------------------------------------- residual blocks of real libraries


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        ("bert", {"BertSelfOutput", "BertOutput"}),  # LayerNorm(hidden_states + input_tensor)
        ("gpt2", {"GPT2Block"}),  # hidden_states = attn_output + residual
        ("llama", {"LlamaDecoderLayer"}),  # hidden_states = residual + hidden_states
        ("vit", {"ViTLayer"}),  # hidden_states = hidden_states + residual
        ("convnext", {"ConvNextLayer"}),  # residual + self.drop_path(features)
        ("resnet", {"ResNetBottleNeckLayer"}),  # shortcut child, hidden_state += residual
    ],
)
def test_residual_blocks_of_transformers_models_are_recognised_and_nothing_else(
    name: str, blocks: set[str]
) -> None:
    model = tiny_transformers(name)
    profile = ModelProfile.inspect(model)
    assert profile.residual
    found = {type(model.get_submodule(path)).__name__ for path in profile.residual_evidence}
    assert found == blocks  # no activation (x + 0.04 * x**3), attention mask or root model
    assert "add residual (skip) connections" not in advise(VANISHING, profile)


def test_parallel_branches_and_tuple_concatenation_are_not_skip_connections() -> None:
    class Collects(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, keep: bool = True) -> tuple[torch.Tensor, ...]:
            states = () if keep else None
            h = self.fc(x)
            assert states is not None
            states = states + (h,)  # noqa: RUF005 (the pattern under test)
            return states

    assert not ModelProfile.inspect(Collects()).residual
    assert not ModelProfile.inspect(ParallelBranches(4)).residual


# ------------------------------------------------------------ initialisation, measured at the start


def test_large_weights_are_profiled_on_a_sample_with_the_same_result() -> None:
    torch.manual_seed(0)
    big = nn.Linear(1024, 1024)  # 1M elements: sampled
    nn.init.kaiming_normal_(big.weight, nonlinearity="relu")
    exact = float(big.weight.detach().std(unbiased=False)) / (2.0 / 1024) ** 0.5
    profile = ModelProfile.inspect(big)
    assert profile.he_ratio == pytest.approx(exact, rel=0.02)
    assert profile.he_ratio == pytest.approx(1.0, rel=0.02)


def test_initialisation_is_kept_from_the_start_when_the_model_changes_later() -> None:
    """A divergence that blows the weights up must not turn into "shrink the initial weights"."""
    torch.manual_seed(0)
    model = zoo.relu_he_bn_mlp(depth=4)
    watch = gw.GradWatch(model, log_every_n_steps=1)
    start = watch.engine.profile.he_ratio
    assert watch.engine.profile.he_scaled
    x = torch.randn(8, 16)
    model(x).sum().backward()
    watch.step()
    with torch.no_grad():  # the run "blew up" ...
        for param in model.parameters():
            param.mul_(50.0)
    model[-1] = nn.Linear(32, 1)  # ... and then the model changed: its layers are read again
    model.zero_grad()
    model(x).sum().backward()
    with pytest.warns(RuntimeWarning, match="model changed"):
        watch.step()
    watch.close()
    assert watch.engine.profile.he_ratio == start
    assert not any("shrink" in item for item in advise(EXPLODING, watch.engine.profile))
    assert ModelProfile.inspect(model).he_ratio > 10 * start  # what re-measuring would say


def test_he_initialised_transformers_resnet_counts_as_he_scaled() -> None:
    profile = ModelProfile.inspect(tiny_transformers("resnet"))
    assert profile.he_scaled  # kaiming_normal_(mode="fan_out") on square-ish convolutions
    assert not any("shrink" in item for item in advise(EXPLODING, profile))


# ------------------------------------------------------------------ advice that agrees with itself

STAGNATION = AlertKind.STAGNATION


def _alert(kind: AlertKind, step: int, advice: tuple[str, ...] = ()) -> gw.Alert:
    return gw.Alert(kind, step, ("0",), 1.0, 1.0, "warning", f"{kind.value} alert", advice)


def test_no_raise_the_learning_rate_for_exactly_zero_gradients() -> None:
    profile = profile_of(zoo.deep_mlp(nn.ReLU, depth=3), optimizer=None)
    silent = advise(STAGNATION, profile, layers=["0"], zero_gradients=["0"])
    assert silent[0].startswith("no gradient reaches 0 (exactly zero)")
    assert not any(item.startswith("raise the learning rate") for item in silent)
    moving = advise(STAGNATION, profile, layers=["0", "2"], zero_gradients=["0"])
    assert "raise the learning rate or check its schedule" in moving  # layer 2 has a gradient


def test_no_raise_the_learning_rate_for_parameters_outside_the_optimizer() -> None:
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    optimizer = torch.optim.SGD(model[-1].parameters(), lr=0.1)  # only the head
    profile = profile_of(model, optimizer=optimizer)
    assert profile.not_optimized == {"0", "2"}
    advice = advise(STAGNATION, profile, layers=["0", "2"])
    assert advice[0].startswith("add the parameters of 0, 2 to the optimizer")
    assert not any(item.startswith("raise the learning rate") for item in advice)


def test_an_aftermath_of_a_divergence_points_back_at_it_instead_of_contradicting_it() -> None:
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    profile = profile_of(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    exploding = _alert(AlertKind.EXPLODING, 3, advise(EXPLODING, profile))
    after = advise(STAGNATION, profile, layers=["0"], earlier=[exploding])
    assert after[0].startswith("first fix the exploding alert of step 3")
    assert not any(
        item.startswith(("raise the learning rate", "use SGD momentum")) for item in after
    )
    alone = advise(STAGNATION, profile, layers=["0"])
    assert alone[0].startswith("raise the learning rate (now 0.01 for SGD)")
    assert advise(SPIKE, profile, earlier=[exploding]) == advise(SPIKE, profile)  # not an aftermath


def test_merged_advice_never_says_both_lower_and_raise_the_learning_rate() -> None:
    lower = _alert(SPIKE, 1, ("lower the learning rate (now 0.1 for SGD)", "enable gw.ZClip"))
    raise_ = _alert(
        STAGNATION, 50, ("raise the learning rate (now 0.1 for SGD) or check its schedule",)
    )
    assert merge_advice([lower, raise_]) == lower.advice
    assert merge_advice([raise_]) == raise_.advice  # nothing contradicts it
