"""A zoo of real architectures with small real data and standard recipes, for the diagnosis tests.

Every model is built from a library definition (``transformers`` configs, random initialisation, no
downloads) or plain PyTorch (LSTM/GRU language models, MLPs), shrunk so that a few hundred steps
take seconds on a CPU. The data is real but small: ``sklearn.datasets.load_digits`` (8x8 digits,
upsampled to 3x32x32 for the vision models) and synthetic token tasks that a model actually learns
(copy for the language models, majority vote for BERT).

A :class:`Task` bundles a model, its optimizer recipe, a batch sampler and the loss, so that the
pathology harness (``tests/pathologies.py``) can plant a fault in any of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

Batch = tuple[torch.Tensor, torch.Tensor]

VOCAB = 16  # token alphabet of the synthetic tasks (plus the separator)
SEP = VOCAB  # separator token of the copy task
COPY_LEN = 8  # tokens to copy
IMAGE = 32  # side of the upsampled digits for the vision models
DIGITS_BATCH = 32
DEPTHWISE_BATCH = 16  # MobileNetV2/EfficientNet: depthwise convolutions are slow on CPUs
TOKEN_BATCH = 16


@dataclass
class Task:
    """One model with its data, loss and training recipe.

    Attributes:
        name: Zoo name (``"resnet"``, ``"gpt2"``, ...).
        model: The model, randomly initialised.
        batch: ``step -> (inputs, targets)``; deterministic given the seed the task was built with.
        loss: ``(model, inputs, targets) -> loss`` (a 0-d tensor).
        optimizer: ``params -> optimizer`` with the family's standard recipe.
        float_inputs: Whether the inputs are floating point (a NaN can be planted in them).
        head: Module-name prefixes of the classification/LM head (the part left trainable when
            the backbone is frozen).
        relu_layer: For ReLU MLPs, the name of a Linear layer followed by a ReLU.
    """

    name: str
    model: nn.Module
    batch: Callable[[int], Batch]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    float_inputs: bool
    head: tuple[str, ...] = ()
    relu_layer: str | None = None


# ---------------------------------------------------------------------------------------- data


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits as standardised ``[N, 64]`` floats and ``[N]`` labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(data.target, dtype=torch.long)


@functools.cache
def _digit_images() -> torch.Tensor:
    """The digits as ``[N, 3, 32, 32]`` images (bilinear upsampling, replicated channels)."""
    x, _ = _digits()
    images = F.interpolate(x.view(-1, 1, 8, 8), size=(IMAGE, IMAGE), mode="bilinear")
    return images.expand(-1, 3, -1, -1).contiguous()


def _sampler(count: int, batch: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``step -> indices``: a fixed random order of the examples, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(count, generator=generator) for _ in range(8)])

    def indices(step: int) -> torch.Tensor:
        start = (step * batch) % (len(order) - batch)
        return order[start : start + batch]

    return indices


def digit_flat_batches(seed: int, batch: int = DIGITS_BATCH) -> Callable[[int], Batch]:
    """Flat ``[B, 64]`` digits and their labels."""
    x, y = _digits()
    indices = _sampler(len(x), batch, seed)
    return lambda step: (x[indices(step)], y[indices(step)])


def digit_image_batches(seed: int, batch: int = DIGITS_BATCH) -> Callable[[int], Batch]:
    """``[B, 3, 32, 32]`` digit images and their labels."""
    images = _digit_images()
    _, y = _digits()
    indices = _sampler(len(images), batch, seed)
    return lambda step: (images[indices(step)], y[indices(step)])


def copy_batches(seed: int, batch: int = TOKEN_BATCH) -> Callable[[int], Batch]:
    """Copy task: ``x SEP x``; targets are the next tokens, ``-100`` before the copy starts."""

    def sample(step: int) -> Batch:
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        source = torch.randint(0, VOCAB, (batch, COPY_LEN), generator=generator)
        sep = torch.full((batch, 1), SEP)
        tokens = torch.cat([source, sep, source], dim=1)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[:, :COPY_LEN] = -100
        return inputs, targets

    return sample


def majority_batches(
    seed: int, batch: int = TOKEN_BATCH, length: int = 15
) -> Callable[[int], Batch]:
    """Majority vote: a sequence of tokens 0/1; the label is the more frequent one."""

    def sample(step: int) -> Batch:
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        bias = torch.rand(batch, 1, generator=generator)
        tokens = (torch.rand(batch, length, generator=generator) < bias).long()
        labels = (tokens.sum(dim=1) * 2 > length).long()
        return tokens + 1, labels  # token 0 is BERT's padding id

    return sample


# ---------------------------------------------------------------------------------------- losses


def _logits_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs), targets)


def _hf_image_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(pixel_values=inputs).logits, targets)


def _hf_lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _hf_cls_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=inputs).logits, targets)


def _lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------------------- recipes


def adamw(
    lr: float, weight_decay: float = 0.01
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """AdamW with the given learning rate (the transformer/ConvNet default recipe)."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def sgd(
    lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """SGD with momentum (the ResNet recipe)."""
    return lambda params: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    )


# ---------------------------------------------------------------------------------------- models


class RecurrentLM(nn.Module):
    """An LSTM or GRU language model: embedding, two recurrent layers, linear head."""

    def __init__(self, cell: str, vocab: int = VOCAB + 1, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = getattr(nn, cell)(width, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden)


def digits_mlp(
    activation: type[nn.Module] = nn.ReLU, depth: int = 3, width: int = 64
) -> nn.Sequential:
    """An MLP on flat digits with PyTorch's default initialisation; ``depth`` Linear layers."""
    layers: list[nn.Module] = []
    dim = 64
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, width), activation()]
        dim = width
    layers.append(nn.Linear(dim, 10))
    return nn.Sequential(*layers)


def _torchvision_init(model: nn.Module) -> None:
    """torchvision's from-scratch EfficientNet initialisation (Kaiming fan-out convs, unit BN).

    transformers initialises EfficientNet's BatchNorm scales from N(0, 0.02) (to be overwritten
    by pretrained weights); trained from there, the forward signal shrinks ~50x per block (1e-35
    at the head), the loss stays at ln(10) and nothing learns: not a healthy reference.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.out_features**0.5
            nn.init.uniform_(module.weight, -bound, bound)
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)


def _resnet(seed: int) -> Task:
    from transformers import ResNetConfig, ResNetForImageClassification

    # ResNet-18's layout (basic blocks, 2 per stage) at a quarter of its width.
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        num_labels=10,
    )
    return Task(
        "resnet",
        ResNetForImageClassification(config),
        digit_image_batches(seed),
        _hf_image_loss,
        sgd(0.05),
        float_inputs=True,
        head=("classifier",),
    )


def _convnext(seed: int) -> Task:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=3,
        patch_size=2,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 2, 1],
        num_labels=10,
    )
    return Task(
        "convnext",
        ConvNextForImageClassification(config),
        digit_image_batches(seed),
        _hf_image_loss,
        adamw(1e-3, 0.05),
        float_inputs=True,
        head=("classifier",),
    )


def _vit(seed: int) -> Task:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return Task(
        "vit",
        ViTForImageClassification(config),
        digit_image_batches(seed),
        _hf_image_loss,
        adamw(1e-3, 0.05),
        float_inputs=True,
        head=("classifier",),
    )


def _mobilenet(seed: int) -> Task:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        num_channels=3, image_size=IMAGE, depth_multiplier=0.35, num_labels=10
    )
    return Task(
        "mobilenet_v2",
        MobileNetV2ForImageClassification(config),
        digit_image_batches(seed, DEPTHWISE_BATCH),
        _hf_image_loss,
        adamw(1e-3),
        float_inputs=True,
        head=("classifier",),
    )


def _efficientnet(seed: int) -> Task:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    # EfficientNet-B0's block layout at a quarter of its width, with a small head.
    config = EfficientNetConfig(
        num_channels=3,
        image_size=IMAGE,
        width_coefficient=0.25,
        depth_coefficient=0.5,
        hidden_dim=320,  # round_filters(1280) at this width: the top conv's channels
        num_labels=10,
    )
    model = EfficientNetForImageClassification(config)
    _torchvision_init(model)
    return Task(
        "efficientnet",
        model,
        digit_image_batches(seed, DEPTHWISE_BATCH),
        _hf_image_loss,
        adamw(1e-3),
        float_inputs=True,
        head=("classifier",),
    )


def _gpt2(seed: int) -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB + 1,
        n_positions=2 * COPY_LEN + 1,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=SEP,
        eos_token_id=SEP,
        tie_word_embeddings=False,
    )
    return Task(
        "gpt2",
        GPT2LMHeadModel(config),
        copy_batches(seed),
        _hf_lm_loss,
        adamw(1e-3),
        float_inputs=False,
        head=("lm_head",),
    )


def _llama(seed: int) -> Task:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * COPY_LEN + 1,
        tie_word_embeddings=False,
    )
    return Task(
        "llama",
        LlamaForCausalLM(config),
        copy_batches(seed),
        _hf_lm_loss,
        adamw(1e-3),
        float_inputs=False,
        head=("lm_head",),
    )


def _bert(seed: int) -> Task:
    from transformers import BertConfig, BertForSequenceClassification

    # BERT-tiny's shape (2 layers, 128 wide, 2 heads) with a small vocabulary.
    config = BertConfig(
        vocab_size=8,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=32,
        num_labels=2,
    )
    return Task(
        "bert",
        BertForSequenceClassification(config),
        majority_batches(seed),
        _hf_cls_loss,
        adamw(1e-4),
        float_inputs=False,
        head=("classifier",),
    )


def _recurrent(cell: str, seed: int) -> Task:
    return Task(
        cell.lower(),
        RecurrentLM(cell),
        copy_batches(seed),
        _lm_loss,
        adamw(3e-3),
        float_inputs=False,
        head=("head",),
    )


def _mlp(seed: int) -> Task:
    return Task(
        "mlp",
        digits_mlp(nn.ReLU, depth=3),
        digit_flat_batches(seed),
        _logits_loss,
        adamw(1e-3),
        float_inputs=True,
        head=("2",),
        relu_layer="0",
    )


def deep_mlp_task(activation: type[nn.Module], seed: int) -> Task:
    """A 20-layer MLP (width 32, default init) on flat digits: vanishing with sigmoid/tanh."""
    return Task(
        f"mlp20_{activation.__name__.lower()}",
        digits_mlp(activation, depth=20, width=32),
        digit_flat_batches(seed),
        _logits_loss,
        adamw(1e-3),
        float_inputs=True,
        head=("38",),
    )


BUILDERS: dict[str, Callable[[int], Task]] = {
    "resnet": _resnet,
    "convnext": _convnext,
    "vit": _vit,
    "mobilenet_v2": _mobilenet,
    "efficientnet": _efficientnet,
    "gpt2": _gpt2,
    "bert": _bert,
    "llama": _llama,
    "lstm": functools.partial(_recurrent, "LSTM"),
    "gru": functools.partial(_recurrent, "GRU"),
    "mlp": _mlp,
}
MODELS = tuple(BUILDERS)


def build(name: str, seed: int = 0) -> Task:
    """Builds the zoo model ``name`` (see :data:`MODELS`) with weights and data from ``seed``."""
    torch.manual_seed(seed)
    return BUILDERS[name](seed)
