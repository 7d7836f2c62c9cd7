"""TensorBoard events: one ``Summary`` proto per step for a ``SummaryWriter``, the equivalent
``add_*`` calls for any other writer-like object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradwatch.sinks.png import encode_png
from gradwatch.sinks.schema import CUSTOM_SCALARS_TAG, Category, layout_as_dict


@dataclass
class Entry:
    """One value to write: ``kind`` is ``scalar``, ``text``, ``histogram`` or ``image``."""

    kind: str
    tag: str
    value: Any


def write_events(writer: Any, events: dict[int, list[Entry]]) -> None:
    """Writes ``{step: entries}``: as protos to a ``SummaryWriter``, else through ``add_*``."""
    file_writer = file_writer_of(writer)  # fetched each time: SummaryWriter reopens it if closed
    if file_writer is not None:
        write_protos(file_writer, events)
    else:
        write_calls(writer, events)


def write_protos(file_writer: Any, events: dict[int, list[Entry]]) -> None:
    """One ``Summary`` proto (one event) per step, holding every value of that step."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    for step, entries in events.items():
        summary = Summary()
        for entry in entries:
            if entry.kind == "scalar":
                summary.value.add(tag=entry.tag, simple_value=entry.value)
            elif entry.kind == "text":
                metadata = SummaryMetadata(
                    plugin_data=SummaryMetadata.PluginData(
                        plugin_name="text", content=TextPluginData(version=0).SerializeToString()
                    )
                )
                tensor = TensorProto(
                    dtype="DT_STRING",
                    string_val=[entry.value.encode("utf-8")],
                    tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
                )
                summary.value.add(tag=entry.tag, metadata=metadata, tensor=tensor)
            elif entry.kind == "histogram":
                hist = entry.value
                proto = HistogramProto(
                    min=hist["min"],
                    max=hist["max"],
                    num=hist["num"],
                    sum=hist["sum"],
                    sum_squares=hist["sum_squares"],
                    bucket_limit=hist["bucket_limits"],
                    bucket=hist["bucket_counts"],
                )
                summary.value.add(tag=entry.tag, histo=proto)
            else:
                height, width, _ = entry.value.shape
                image = Summary.Image(
                    height=height,
                    width=width,
                    colorspace=3,
                    encoded_image_string=encode_png(entry.value),
                )
                summary.value.add(tag=entry.tag, image=image)
        file_writer.add_summary(summary, step)


def write_calls(writer: Any, events: dict[int, list[Entry]]) -> None:
    """The same events through the writer's public ``add_*`` methods (any writer-like object)."""
    for step, entries in events.items():
        for entry in entries:
            if entry.kind == "scalar":
                writer.add_scalar(entry.tag, entry.value, step)
            elif entry.kind == "text":
                call_if_present(writer, "add_text", entry.tag, entry.value, step)
            elif entry.kind == "histogram":
                call_if_present(
                    writer, "add_histogram_raw", entry.tag, global_step=step, **entry.value
                )
            else:
                call_if_present(
                    writer, "add_image", entry.tag, entry.value, step, dataformats="HWC"
                )


def write_layout(writer: Any, layout: list[Category]) -> None:
    """Writes the custom-scalars layout (``closed`` categories only survive the proto route)."""
    file_writer = file_writer_of(writer)
    if file_writer is None:
        call_if_present(writer, "add_custom_scalars", layout_as_dict(layout))
        return
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2

    proto = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=category.title,
                closed=category.closed,
                chart=[
                    layout_pb2.Chart(
                        title=chart.title,
                        multiline=layout_pb2.MultilineChartContent(tag=list(chart.tags)),
                    )
                    for chart in category.charts
                ],
            )
            for category in layout
        ]
    )
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[proto.SerializeToString()],
        tensor_shape=TensorShapeProto(),
    )
    value = Summary.Value(tag=CUSTOM_SCALARS_TAG, tensor=tensor, metadata=metadata)
    summary = Summary(value=[value])
    file_writer.add_summary(summary)


def file_writer_of(writer: Any) -> Any:
    """The ``FileWriter`` of a ``torch.utils.tensorboard.SummaryWriter``, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return None
    if isinstance(writer, SummaryWriter):
        return writer._get_file_writer()
    return None


def call_if_present(obj: Any, method: str, *args: Any, **kwargs: Any) -> None:
    """Calls ``obj.method(...)`` when the object has it (writer-like objects may lack some)."""
    function = getattr(obj, method, None)
    if callable(function):
        function(*args, **kwargs)
