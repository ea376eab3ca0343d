"""The demo page's layout (Gradio Blocks) and server; the work is `fscs.demo.handlers.answer`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fscs.demo import MAX_UPLOAD
from fscs.demo.handlers import MAX_CLASSES, MAX_SHOTS, ClassInput, Models, SupportInput, answer, brush_mask
from fscs.demo.workspace import CheckpointInfo, find_checkpoints, find_examples

# before gradio is imported: no usage statistics, no hub lookups
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

if TYPE_CHECKING:
    from fscs.config.params import Config

#: System fonts only: Gradio's default theme would fetch its fonts from Google.
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
IMAGE_HEIGHT = 180

INTRO = """# fscs: few-shot classification and segmentation
Pick a checkpoint, give each class a name and 1-5 support images (a mask is optional: upload a PNG whose
non-zero pixels are the class, or paint it; without one the support's attention pseudo-mask is used), add a
query and press **Run**. Classes the checkpoint was not trained on are the interesting ones. Uploads up to
{limit}; nothing leaves this machine."""

NO_CHECKPOINTS = """**No trained checkpoints in `{where}`.** Make them with `make run` (or `dvc repro`), which
writes `models/cst/<setting>/fold<f>.pt`, then reload this page's server (`make demo`)."""


def _slot_inputs(values: list[Any]) -> list[ClassInput]:
    """The flat list of page values (per class: name, stuff, then per support: image, mask, editor) ->
    ClassInputs."""
    classes, it = [], iter(values)
    for _ in range(MAX_CLASSES):
        name, stuff = next(it), next(it)
        supports = []
        for _ in range(MAX_SHOTS):
            image, mask, editor = next(it), next(it), next(it)
            supports.append(SupportInput(image or None, mask or None, brush_mask(editor)))
        classes.append(ClassInput(name or "", bool(stuff), supports))
    return classes


def build(workspace: str | os.PathLike = ".", config: Config | None = None) -> gr.Blocks:
    """The page for a workspace's checkpoints; the model of each loads once, on its first request."""
    checkpoints = find_checkpoints(workspace)
    by_label: dict[str, CheckpointInfo] = {c.label: c for c in checkpoints}
    models = Models(config)
    examples = find_examples(workspace, checkpoints)

    def run(checkpoint_label: str | None, query: str | None, *values: Any):
        info = by_label.get(checkpoint_label or "")
        reply = answer(models, info.path if info else None, _slot_inputs(list(values)), query)
        if reply.error:
            return f"**error:** {reply.error}", None, "", []
        return reply.summary, reply.overlay, reply.legend, reply.supports

    with gr.Blocks(title="fscs demo", analytics_enabled=False) as page:
        gr.Markdown(INTRO.format(limit=MAX_UPLOAD.upper().replace("MB", " MB")))
        if not checkpoints:
            gr.Markdown(
                NO_CHECKPOINTS.format(where=Path(workspace).resolve() / "models" / "cst"), elem_id="message"
            )
            return page
        checkpoint = gr.Dropdown(
            choices=list(by_label), value=checkpoints[0].label, label="checkpoint", elem_id="checkpoint"
        )
        slots: list[gr.components.Component] = []
        firsts: list[tuple[Any, Any, Any]] = []
        with gr.Row():
            for k in range(MAX_CLASSES):
                with gr.Column(scale=2):
                    name = gr.Textbox(label=f"class {k + 1} name", elem_id=f"class{k}-name")
                    stuff = gr.Checkbox(
                        label="stuff class (grass, sky, ...): supports without a mask use the complement of "
                        "their pseudo-mask",
                        elem_id=f"class{k}-stuff",
                    )
                    slots += [name, stuff]
                    for j in range(MAX_SHOTS):
                        with gr.Accordion(f"support {j + 1}", open=j == 0):
                            with gr.Row():
                                image = gr.Image(
                                    type="filepath",
                                    label="image",
                                    sources=["upload"],
                                    height=IMAGE_HEIGHT,
                                    elem_id=f"c{k}s{j}-image",
                                )
                                mask = gr.Image(
                                    type="filepath",
                                    label="mask PNG (optional)",
                                    sources=["upload"],
                                    height=IMAGE_HEIGHT,
                                    elem_id=f"c{k}s{j}-mask",
                                )
                            editor = gr.ImageEditor(
                                type="numpy",
                                label="or paint the mask on the image (optional)",
                                sources=[],
                                transforms=[],
                                format="png",
                                height=IMAGE_HEIGHT + 60,
                                elem_id=f"c{k}s{j}-brush",
                            )
                            image.change(_editor_background, image, editor)
                            slots += [image, mask, editor]
                            if j == 0:
                                firsts.append((name, image, mask))
            with gr.Column(scale=3):
                query = gr.Image(
                    type="filepath", label="query", sources=["upload"], height=IMAGE_HEIGHT, elem_id="query"
                )
                button = gr.Button("Run", variant="primary", elem_id="run")
                message = gr.Markdown(elem_id="message")
                overlay = gr.Image(
                    label="query overlay",
                    type="numpy",
                    format="png",
                    interactive=False,
                    height=2 * IMAGE_HEIGHT,
                    elem_id="overlay",
                )
                legend = gr.HTML(elem_id="legend")
                taught = gr.Gallery(
                    label="the mask each support was taught with",
                    format="png",
                    columns=5,
                    height=IMAGE_HEIGHT,
                    elem_id="taught",
                )
        button.click(run, [checkpoint, query, *slots], [message, overlay, legend, taught])
        if examples:
            name, image, mask = firsts[0]
            gr.Examples(
                [[e.checkpoint, e.cls, e.support, e.mask, e.query] for e in examples],
                [checkpoint, name, image, mask, query],
                label="test episodes of this workspace (1-way 1-shot, classes novel to the checkpoint)",
                cache_examples=False,
            )
    return page


def _editor_background(image: str | None) -> dict[str, Any] | None:
    """Show a newly uploaded support image in its brush editor, with no strokes yet."""
    if not image:
        return None
    return {"background": image, "layers": [], "composite": image}


def theme() -> gr.themes.Base:
    return gr.themes.Base(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def serve(workspace: str, host: str, port: int, params_path: str | None, share: bool = False) -> None:
    """Serve the page until interrupted (bound to ``host``; no public link unless ``share``)."""
    from fscs.predict.inputs import read_config

    page = build(workspace, read_config(params_path))
    page.queue(default_concurrency_limit=1)  # one episode at a time: the CPU threads are shared
    page.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD,
        theme=theme(),
        ssr_mode=False,
        footer_links=[],
        quiet=False,
    )
