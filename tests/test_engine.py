"""The engine on its own: its import boundary, the package's dependency rules, and detectors and
remedies unit-tested against observations built by hand (``tests/factories.py``)."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine import Engine, WatchConfig
from gradwatch.engine.alerts import AlertKind
from tests import factories

PACKAGE = Path(__file__).resolve().parents[1] / "gradwatch"

# ----------------------------------------------------------------------------- architecture


def test_importing_the_engine_loads_no_frontend_sink_or_framework() -> None:
    code = (
        "import sys, gradwatch.engine, gradwatch.engine.engine\n"
        "prefixes = ('gradwatch.watch', 'gradwatch.lightning', 'gradwatch.sinks', "
        "'gradwatch.summary', 'gradwatch.preflight', 'gradwatch.report', 'gradwatch.demo', "
        "'gradwatch.cli', 'gradwatch.integrations', 'tensorboard', 'pytorch_lightning', "
        "'lightning', 'transformers', 'accelerate', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.startswith(prefixes)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from gradwatch... import`` in a file (any depth)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradwatch"):
            found.append((node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("gradwatch")]
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_the_engine_imports_only_the_engine() -> None:
    for path in (PACKAGE / "engine").glob("*.py"):
        for module, _ in _imports(path):
            assert module.startswith("gradwatch.engine"), (path.name, module)


def test_no_module_imports_another_modules_private_names() -> None:
    for path in PACKAGE.rglob("*.py"):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, (path.name, module, private)


def test_the_package_has_no_import_cycle() -> None:
    modules = {_module_name(p).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in tree.body:  # module-level imports only: what runs at import time
            if isinstance(node, ast.ImportFrom) and (node.module or "") in modules:
                for alias in node.names:  # ``from package import submodule`` targets the submodule
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module or "")
        graph[name] = targets - {name, "gradwatch"}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name) :], name])
        if name in done:
            return
        visiting.append(name)
        for target in graph[name]:
            visit(target)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_the_engine_is_fully_built_at_construction() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = Engine(model, config=WatchConfig(detectors=[gw.SpikeDetector()]))
    assert engine.layer_names == ["0", "2"]
    assert engine.history.num_layers == 2 and engine.probe.num_layers == 2
    detector = engine.detectors[0]
    assert isinstance(detector, gw.SpikeDetector) and detector.mean.shape == (3,)
    engine.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"log_every_n_steps": 10**15}, "log_every_n_steps"),
        ({"window": "10"}, "window"),
        ({"check_activations": "no"}, "check_activations"),
        ({"track_updates": 1}, "track_updates"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"detectors": "all"}, "detectors"),
        ({"detectors": [object()]}, r"detectors\[0\]"),
        ({"remedies": gw.ZClip()}, "remedies"),
        ({"on_alert": 3}, "on_alert"),
    ],
)
def test_watch_config_names_the_bad_argument(options: dict[str, object], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        WatchConfig(**options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- detectors


def _bound(detector: gw.Detector, numels: tuple[int, ...] = (64, 64, 64, 64)) -> gw.Detector:
    detector.bind(factories.layout(numels))
    return detector


def test_vanishing_fires_after_patience_and_carries_its_run_across_blocks() -> None:
    detector = _bound(gw.VanishingDetector(ratio=1e-2, patience=5))
    tiny = [1e-6, 1.0, 1.0, 1.0]  # first quarter 1e6 times below the last
    first = detector.observe(factories.observation([tiny] * 3))
    assert first.fired.tolist() == [False, False, False]
    second = detector.observe(factories.observation([tiny] * 3))
    assert second.fired.tolist() == [False, True, True]  # steps 4 and 5 of the run
    assert second.scores is not None and second.scores[-1].argmax() == 0  # names layer "0"


def test_vanishing_stays_quiet_when_the_profile_is_flat_or_steps_are_invalid() -> None:
    detector = _bound(gw.VanishingDetector(ratio=1e-2, patience=2))
    flat = detector.observe(factories.observation([[0.5, 1.0, 1.0, 2.0]] * 5))
    invalid = detector.observe(factories.observation([[1e-6, 1.0, 1.0, 1.0]] * 5, valid=False))
    assert not flat.fired.any() and not invalid.fired.any()


def test_spike_fires_on_a_jump_against_its_history_and_not_before() -> None:
    detector = _bound(gw.SpikeDetector(warmup=5))
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        norms = (1.0 + 0.1 * torch.rand(4, generator=generator)).tolist()
        assert not detector.observe(factories.observation(norms)).fired.any()
    spike = detector.observe(factories.observation([1.0, 1.0, 50.0, 1.0]))
    assert spike.fired.tolist() == [True]
    assert spike.scores is not None and spike.scores[0].argmax() == 2


def test_exploding_judges_the_update_the_optimizer_makes() -> None:
    detector = _bound(gw.ExplodingDetector(adaptive_ratio=0.3, sgd_ratio=1.5))
    weights = [8.0] * 4  # weight RMS 1 (64 elements)
    adam = {"weight_norms": weights, "update_rule": "adaptive"}
    calm = detector.observe(factories.observation([1e3] * 4, lr=[0.1] * 4, **adam))
    high = detector.observe(factories.observation([1e-3] * 4, lr=[0.1, 0.1, 0.5, 0.0], **adam))
    assert calm.fired.tolist() == [False] and high.fired.tolist() == [True]  # lr, not gradient
    assert high.scores is not None and high.scores[0].tolist() == [0.0, 0.0, 0.5, 0.0]
    sgd = {"weight_norms": weights, "update_rule": "sgd"}
    small = detector.observe(factories.observation([8.0, 8.0, 8.0, 1e6], lr=[1.0, 1, 1, 0], **sgd))
    big = detector.observe(factories.observation([8.0, 8.0, 16.0, 1e6], lr=[1.0, 1, 1, 0], **sgd))
    assert small.fired.tolist() == [False] and big.fired.tolist() == [True]
    assert big.scores is not None and big.scores[0].tolist() == [0.0, 0.0, 2.0, 0.0]
    assert detector.threshold == 1.5 and big.value.tolist() == [2.0]
    unknown = detector.observe(factories.observation([1e6] * 4, lr=[9.0] * 4, weight_norms=weights))
    assert unknown.fired.tolist() == [False]  # no update rule: not judged


def test_nonfinite_names_the_deepest_nonfinite_layer_or_the_loss() -> None:
    detector = _bound(gw.NonFiniteDetector())
    nan = math.nan
    layers = detector.observe(factories.observation([1.0, nan, nan, 1.0]))
    assert layers.fired.tolist() == [True]
    assert layers.scores is not None and layers.scores[0].argmax() == 2  # deepest first
    loss = detector.observe(factories.observation([1.0] * 4, loss_finite=False))
    assert loss.fired.tolist() == [True] and loss.value.tolist() == [float(gw.Origin.LOSS)]
    assert not detector.observe(factories.observation([1.0] * 4)).fired.any()


def test_stagnation_counts_only_updates_that_happened() -> None:
    detector = _bound(gw.StagnationDetector(ratio=1e-6, patience=2))
    tiny = [1e-9, 1e-3, 1e-3, 1e-3]
    skipped = detector.observe(
        factories.observation([1.0] * 4, update_ratio=tiny, update_applied=False)
    )
    assert not skipped.fired.any()
    detector.observe(factories.observation([1.0] * 4, update_ratio=tiny))
    fired = detector.observe(factories.observation([1.0] * 4, update_ratio=tiny))
    assert fired.fired.tolist() == [True] and fired.scores is not None
    assert fired.scores[0].argmax() == 0


def test_declared_state_round_trips_through_plain_values() -> None:
    detector = _bound(gw.SpikeDetector(warmup=2))
    for norms in ([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5]):
        detector.observe(factories.observation(norms))
    state = detector.state_dict()
    assert set(state) == {"mean", "var", "count"} and all(
        isinstance(v, list) for v in state.values()
    )
    fresh = _bound(gw.SpikeDetector(warmup=2))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mean, detector.mean) and torch.equal(fresh.count, detector.count)
    with pytest.raises(ValueError, match="shape"):
        _bound(gw.SpikeDetector(), numels=(8, 8)).load_state_dict(state)


# ----------------------------------------------------------------------------- remedies


def test_clipnorm_decides_the_clip_grad_norm_coefficient() -> None:
    remedy = gw.ClipNorm(max_norm=1.0)
    remedy.bind(factories.layout())
    decision = remedy.decide(factories.remedy_input(factories.observation([3.0, 4.0, 0.0, 0.0])))
    assert decision.clip_coef is not None
    assert float(decision.clip_coef) == pytest.approx(1.0 / (5.0 + 1e-6))
    calm = remedy.decide(factories.remedy_input(factories.observation([0.3, 0.4, 0.0, 0.0])))
    assert calm.clip_coef is not None and float(calm.clip_coef) == 1.0


def test_skipstep_and_lrbackoff_decide_from_the_flags() -> None:
    skip, backoff = gw.SkipStep(on=("spike",)), gw.LRBackoff(factor=0.5)
    for remedy in (skip, backoff):
        remedy.bind(factories.layout())
    obs = factories.observation([1.0] * 4)
    spiked = factories.remedy_input(obs, flags={AlertKind.SPIKE: True})
    calm = factories.remedy_input(obs, flags={AlertKind.SPIKE: False})
    assert skip.decide(spiked).skip and not skip.decide(calm).skip
    assert backoff.decide(spiked).lr_scale == 0.5
    assert skip.skipped == 1 and backoff.backoffs == 1


def test_zclip_leaves_warmup_alone_and_clips_an_outlier() -> None:
    remedy = gw.ZClip(warmup_steps=5)
    remedy.bind(factories.layout())
    for value in (1.0, 1.1, 0.9, 1.0, 1.05, 0.95):
        decision = remedy.decide(factories.remedy_input(factories.observation([value, 0, 0, 0])))
        assert decision.clip_coef is not None and float(decision.clip_coef) == 1.0
    outlier = remedy.decide(factories.remedy_input(factories.observation([10.0, 0, 0, 0])))
    assert outlier.clip_coef is not None and float(outlier.clip_coef) < 0.2


def test_no_attribute_is_created_outside_init() -> None:
    """Every ``self.x = ...`` outside ``__init__`` assigns an attribute that ``__init__`` (its own
    or a base class's, ``add_state`` included) or a class annotation already declared."""
    classes: dict[str, tuple[Path, ast.ClassDef]] = {}
    checked: list[tuple[Path, ast.ClassDef]] = []  # every class, even two of one name
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (path, node)
                checked.append((path, node))

    def declared(cls: ast.ClassDef) -> set[str]:
        names = {
            n.target.id
            for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }
        for method in cls.body:
            if isinstance(method, ast.FunctionDef) and method.name == "__init__":
                names |= _self_assignments(method) | _declared_state(method)
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                names |= declared(classes[base.id][1])
        return names

    for path, cls in checked:
        known = declared(cls)
        for method in cls.body:
            if isinstance(method, ast.FunctionDef) and method.name != "__init__":
                extra = _self_assignments(method) - known
                assert not extra, (path.name, cls.name, method.name, extra)


def _self_assignments(function: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (
                    isinstance(element, ast.Attribute)
                    and isinstance(element.value, ast.Name)
                    and element.value.id == "self"
                ):
                    names.add(element.attr)
    return names


def _declared_state(function: ast.FunctionDef) -> set[str]:
    """Names declared with ``self.add_state("name", ...)``."""
    return {
        node.args[0].value
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_state"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }
