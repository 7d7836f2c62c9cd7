"""Generates ``docs/api.md``, the API reference, from the docstrings of the public API.

Run ``python scripts/api_docs.py`` after changing a public docstring or signature;
``tests/test_api_docs.py`` fails while the page is stale. ``--check`` only compares (exit 1 when
stale). No network, no third-party documentation tool: ``inspect`` and a small reader of the
Google-style sections (``Args:``, ``Returns:``, ``Raises:``, ``Attributes:``, ``Example:``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"

SECTIONS: list[tuple[str, list[str]]] = [
    (
        "Watching a training loop",
        ["gradwatch.GradWatch", "gradwatch.StepReport", "gradwatch.WatchConfig"],
    ),
    (
        "Alerts",
        ["gradwatch.Alert", "gradwatch.AlertKind", "gradwatch.Origin", "gradwatch.GradientError"],
    ),
    (
        "Detectors",
        [
            "gradwatch.Detector",
            "gradwatch.VanishingDetector",
            "gradwatch.ExplodingDetector",
            "gradwatch.ExplodingProfileDetector",
            "gradwatch.NormGrowthDetector",
            "gradwatch.SpikeDetector",
            "gradwatch.NonFiniteDetector",
            "gradwatch.ZeroGradientDetector",
            "gradwatch.SaturationDetector",
            "gradwatch.DeadUnitsDetector",
            "gradwatch.StagnationDetector",
        ],
    ),
    (
        "Remedies",
        [
            "gradwatch.Remedy",
            "gradwatch.ClipNorm",
            "gradwatch.AutoClip",
            "gradwatch.ZClip",
            "gradwatch.AGC",
            "gradwatch.LRBackoff",
            "gradwatch.SkipStep",
        ],
    ),
    (
        "Writing your own detector or remedy",
        [
            "gradwatch.engine.Observation",
            "gradwatch.engine.Detection",
            "gradwatch.engine.RemedyInput",
            "gradwatch.engine.Decision",
        ],
    ),
    (
        "Sinks",
        [
            "gradwatch.Sink",
            "gradwatch.TensorBoardSink",
            "gradwatch.LoggerMetricsSink",
            "gradwatch.WandbSink",
            "gradwatch.MlflowSink",
        ],
    ),
    ("Before training", ["gradwatch.audit", "gradwatch.AuditReport"]),
    ("PyTorch Lightning", ["gradwatch.lightning.GradWatchCallback"]),
    ("Hugging Face Trainer", ["gradwatch.integrations.transformers.GradWatchCallback"]),
    ("Reading runs back", ["gradwatch.report.load_reports", "gradwatch.report.RunReport"]),
    ("Command line", ["gradwatch.cli.main"]),
]

_SECTION_HEADER = re.compile(
    r"^(Args|Arguments|Returns|Yields|Raises|Attributes|Example|Examples|Note|Notes):\s*$"
)
_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc):`~?([^`]+)`")


def anchor(dotted: str) -> str:
    """The HTML anchor of a documented name: ``gradwatch.GradWatch`` -> ``gradwatch``,
    ``gradwatch.lightning.GradWatchCallback`` -> ``lightning-gradwatchcallback``."""
    return dotted.removeprefix("gradwatch.").replace(".", "-").lower()


def resolve(dotted: str) -> Any:
    """The object a dotted name points to (``gradwatch.lightning.GradWatchCallback``)."""
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def inline(text: str) -> str:
    """reST inline markup as Markdown: roles become code spans, double backquotes single ones."""

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        return f"`{target.rsplit('.', 1)[-1] if match.group(0).count('~') else target}`"

    text = _ROLE.sub(role, text)
    return text.replace("``", "`")


def render_docstring(doc: str | None) -> list[str]:
    """Markdown of a Google-style docstring: paragraphs, then one block per section."""
    if not doc:
        return []
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    section: str | None = None
    items: list[list[str]] = []

    def close_section() -> None:
        if section is None:
            return
        if section in ("Example", "Examples"):
            code = [line for item in items for line in item]
            while code and not code[-1].strip():
                code.pop()
            out.extend(["", f"**{section}**", "", "```python", *code, "```"])
            return
        out.extend(["", f"**{section}**", ""])
        if section not in ("Args", "Arguments", "Attributes", "Raises"):
            out.append(inline(" ".join(part.strip() for item in items for part in item)))
            return
        for item in items:
            text = " ".join(part.strip() for part in item if part.strip())
            name, colon, rest = text.partition(":")
            if (
                colon
                and section in ("Args", "Arguments", "Attributes", "Raises")
                and " " not in (name.strip())
            ):
                out.append(f"- `{name.strip()}`: {inline(rest.strip())}")
            else:
                out.append(f"- {inline(text)}")

    paragraph: list[str] = []
    for line in lines:
        header = _SECTION_HEADER.match(line)
        if header and not line.startswith(" "):
            if paragraph:
                out.append(inline(" ".join(paragraph)))
                paragraph = []
            close_section()
            section, items = header.group(1), []
            continue
        if section is None:
            if line.strip():
                if line.lstrip().startswith(("- ", ">>> ", "| ")) and paragraph:
                    out.append(inline(" ".join(paragraph)))
                    paragraph = []
                if line.lstrip().startswith(("- ", "| ")):
                    out.append(inline(line.strip()))
                elif line.startswith("    ") and out and out[-1].startswith("- "):
                    out[-1] += " " + inline(line.strip())
                else:
                    paragraph.append(line.strip())
            else:
                if paragraph:
                    out.append(inline(" ".join(paragraph)))
                    paragraph = []
                if out and out[-1] != "":
                    out.append("")
            continue
        body = line[4:] if line.startswith("    ") else line.strip()
        if section in ("Example", "Examples"):
            items.append([body])
        elif not body.strip():
            continue
        elif body.startswith(" ") and items:
            items[-1].append(body)
        else:
            items.append([body])
    if paragraph:
        out.append(inline(" ".join(paragraph)))
    close_section()
    while out and not out[-1]:
        out.pop()
    return out


def signature(obj: Any, name: str) -> str:
    """``name(arguments)``, one argument per line when long."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return name
    parameters = list(sig.parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    rendered: list[str] = []
    star_done = False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not star_done:
            rendered.append("*")
            star_done = True
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            star_done = True
        text = parameter.name
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            text = "*" + text
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            text = "**" + text
        if parameter.annotation is not inspect.Parameter.empty:
            text += f": {_annotation(parameter.annotation)}"
        if parameter.default is not inspect.Parameter.empty:
            text += f" = {_default(parameter.default)}"
        rendered.append(text)
    returns = ""
    if not inspect.isclass(obj) and sig.return_annotation is not inspect.Signature.empty:
        returns = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{name}({', '.join(rendered)}){returns}"
    if len(one_line) <= 90:
        return one_line
    body = "".join(f"    {item},\n" for item in rendered)
    return f"{name}(\n{body}){returns}"


def _annotation(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    text = repr(value)
    if " at 0x" in text:
        raise ValueError(f"a default without a stable repr: {text}")
    return text


def members(cls: type, documented: dict[type, str]) -> list[tuple[str, Any]]:
    """Public methods and properties with a docstring of their own, defined by ``cls`` or by a
    gradwatch base class that no documented base of ``cls`` already shows."""
    documented_bases = [b for b in cls.__mro__[1:] if b in documented]
    owners = [cls] + [
        base
        for base in cls.__mro__[1:]
        if base.__module__.startswith("gradwatch")
        and base not in documented
        and not any(base in shown.__mro__ for shown in documented_bases)
    ]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    found: dict[str, Any] = {}
    for owner in owners:
        for name, value in vars(owner).items():
            if name.startswith("_") or name in found or name in fields:
                continue
            function = value.fget if isinstance(value, property) else value
            if isinstance(value, staticmethod | classmethod):
                function = value.__func__
            if callable(function) and function.__doc__:
                found[name] = value
    return sorted(found.items())


def render_object(dotted: str, documented: dict[type, str]) -> list[str]:
    """The section of one class or function: signature, docstring, members."""
    obj = resolve(dotted)
    public = dotted.replace("gradwatch.", "gw.", 1) if dotted.count(".") == 1 else dotted
    name = public.rsplit(".", 1)[-1]
    out = [f'### <a id="{anchor(dotted)}"></a>`{public}`', ""]
    if inspect.isclass(obj) and issubclass(obj, enum.Enum):
        out += ["```python", f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})", "```"]
    else:
        out += ["```python", signature(obj, public), "```"]
    bases = [
        base for base in (obj.__mro__[1:] if inspect.isclass(obj) else []) if base in documented
    ]
    if bases:
        out += ["", f"Subclass of [`{bases[0].__name__}`](#{documented[bases[0]]})."]
    out += [
        "",
        *render_docstring(obj.__doc__),
    ]
    if inspect.isclass(obj) and issubclass(obj, enum.Enum):
        out += ["", "| member | value |", "|---|---|"]
        out += [f"| `{member.name}` | `{member.value!r}` |" for member in obj]
    elif inspect.isclass(obj):
        for member_name, value in members(obj, documented):
            out += ["", *render_member(name, member_name, value)]
    return out


def render_member(owner: str, name: str, value: Any) -> list[str]:
    if isinstance(value, property):
        doc = value.fget.__doc__ if value.fget is not None else None
        return [f"#### `{owner}.{name}` (property)", "", *render_docstring(doc)]
    function = value.__func__ if isinstance(value, staticmethod | classmethod) else value
    text = signature(function, f"{owner}.{name}")
    head = (
        [f"#### `{text}`"]
        if "\n" not in text
        else [f"#### `{owner}.{name}`", "", "```python", text, "```"]
    )
    return [*head, "", *render_docstring(function.__doc__)]


def generate() -> str:
    """The whole page."""
    documented = {
        resolve(name): anchor(name)
        for _, names in SECTIONS
        for name in names
        if inspect.isclass(resolve(name))
    }
    import gradwatch

    lines = [
        "# gradwatch API reference",
        "",
        f"gradwatch {gradwatch.__version__}. Generated from the docstrings by "
        "`python scripts/api_docs.py`; do not edit by hand (`tests/test_api_docs.py` fails when "
        "this page is stale). `gw` is `import gradwatch as gw`.",
        "",
        "## Contents",
        "",
    ]
    for title, names in SECTIONS:
        links = ", ".join(f"[`{n.rsplit('.', 1)[-1]}`](#{anchor(n)})" for n in names)
        lines.append(f"- {title}: {links}")
    for title, names in SECTIONS:
        lines += ["", f"## {title}"]
        for dotted in names:
            lines += ["", *render_object(dotted, documented)]
    text = "\n".join(lines) + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(OUTPUT)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
