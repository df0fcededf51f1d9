"""The Gradio app: pick an image (or draw a testbed scene), ask a question, pick a method (and optionally a second
one to compose), and see the unpatched and the patched model side by side.

``build_app(pool)`` builds the Blocks; :func:`launch` serves it with no network use (analytics off, no share link,
system fonts, no server-side rendering). ``vlm-accel demo`` and ``demo/app.py`` (the Space) both call
:func:`main_app`.
"""

from __future__ import annotations

import html
import logging
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from vlm_accel.config import MethodConfig  # noqa: E402
from vlm_accel.demo import pictures  # noqa: E402
from vlm_accel.demo.controls import FieldSpec, base_config, build_config, control_value, field_specs  # noqa: E402
from vlm_accel.demo.runner import MAX_QUESTION_CHARS, DemoResult, SlotPool, open_image, run_request  # noqa: E402
from vlm_accel.registry import list_methods  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_ENV, SLOTS_ENV, DEVICE_ENV = "VLM_ACCEL_DEMO_MODEL", "VLM_ACCEL_DEMO_SLOTS", "VLM_ACCEL_DEMO_DEVICE"
NONE = "none"
FAMILY_CHOICES = ("any", "color", "shape", "count", "exist", "position")
INTRO = """# vlm_accel demo
One image, one question, the same model twice: **unpatched** on the left, **patched** with the method you pick on
the right (`patch_model(model, method, ...)`). Every control under a method is generated from its config dataclass.
"""


@dataclass
class MethodPanel:
    """The controls of one method in one picker (A: the method, B: the method composed with it)."""

    name: str
    base: MethodConfig | None
    specs: list[FieldSpec] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)
    group: Any = None
    unavailable: str = ""


def _method_panels(slot: str, names: list[str]) -> list[MethodPanel]:
    panels = []
    for name in names:
        try:
            base = base_config(name)
        except ValueError as err:  # MethodNotApplicable: e.g. SGL without its guide's weights
            panels.append(MethodPanel(name, None, unavailable=str(err)))
            continue
        specs, notes = field_specs(base)
        panel = MethodPanel(name, base, specs)
        with gr.Group(visible=False) as panel.group:
            if notes:
                gr.Markdown("; ".join(notes))
            for spec in specs:
                panel.components.append(_component(spec, f"param-{slot}-{name}-{spec.name}"))
        panels.append(panel)
    return panels


def _component(spec: FieldSpec, elem_id: str):
    value = control_value(spec)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), label=spec.hint(), elem_id=elem_id)
    if spec.kind in ("int", "float") and not spec.optional:  # an empty gr.Number posts 0, so optional ones are text
        return gr.Number(value=value, label=spec.hint(), precision=0 if spec.kind == "int" else None,
                         elem_id=elem_id)  # fmt: skip
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, label=spec.hint(), elem_id=elem_id)
    return gr.Textbox(value="" if value is None else str(value), label=spec.hint(), elem_id=elem_id, max_lines=1)


def _configs(method_a: str, method_b: str, panels: dict[str, list[MethodPanel]], values: list[Any]) -> list:
    """The configs the two pickers describe (``values``: every control's value, in panel order)."""
    chosen = {"a": method_a, "b": method_b}
    configs, cursor = [], 0
    for slot in ("a", "b"):
        for panel in panels[slot]:
            mine = values[cursor : cursor + len(panel.components)]
            cursor += len(panel.components)
            if panel.name != chosen[slot]:
                continue
            if panel.base is None:
                raise ValueError(f"{panel.name} is not available here: {panel.unavailable}")
            try:
                configs.append(build_config(panel.base, panel.specs, mine))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{panel.name}: {err}") from None
    if not configs:
        raise ValueError("Pick a method.")
    if method_a == method_b:
        raise ValueError(f"{method_a} is picked twice; compose two different methods.")
    return configs


def _kept_line(result: DemoResult) -> str:
    arm, n = result.patched, result.n_visual
    sgl = arm.method_stats.get("sgl", {})
    if any(sgl.get("last_exited", [])):
        return "early exit: the guide's answer, the large model skipped"
    parts = [f"{int(kept.sum())}/{n} from layer {layer}" for layer, kept in arm.stages]
    return "visual tokens kept: " + (", ".join(parts) if parts else f"all {n}")


def _metrics(arm, label: str) -> str:
    peak = "not measured on CPU" if arm.peak_mem_bytes is None else f"{arm.peak_mem_bytes / 2**20:.1f} MiB"
    kv = "-" if arm.kv_bytes is None else f"{arm.kv_bytes / 1024:.0f} KiB"
    return (f"**{label}** · prefill {arm.prefill_s * 1e3:.1f} ms · end to end {arm.total_s * 1e3:.1f} ms · "
            f"{arm.tokens_per_s:.1f} tokens/s · KV {kv} · peak memory {peak}")  # fmt: skip


def _method_notes(result: DemoResult) -> str:
    notes = []
    for name, stats in result.patched.method_stats.items():
        shown = {k: v for k, v in stats.items() if isinstance(v, bool | int | float | str) or k.startswith("last_")}
        if shown:
            notes.append(f"`{name}`: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in shown.items()))  # fmt: skip
    return "\n\n".join(notes)


def draw_scene(seed: Any, family: str, scene_dir: Path) -> tuple[str, str, str, str]:
    """A testbed scene and question: (image path, question, ground-truth line, status)."""
    from vlm_accel.testbed.dataset import make_item
    from vlm_accel.testbed.questions import FAMILIES
    from vlm_accel.testbed.scenes import render

    try:
        seed = int(seed)
    except (TypeError, ValueError):
        return gr.update(), gr.update(), gr.update(), _error("the scene seed must be a whole number")
    if not 0 <= seed < 2**31:
        return gr.update(), gr.update(), gr.update(), _error("the scene seed must be in [0, 2^31)")
    fam = FAMILIES[seed % len(FAMILIES)] if family == "any" else family
    scene, qa = make_item(seed, 0, fam, split="test")
    path = scene_dir / f"scene-{seed}-{fam}.png"
    render(scene).save(path)
    return str(path), qa.question, f"Ground truth for the drawn scene: **{qa.answer}** ({fam})", ""


def _error(message: str, request: int = 0) -> str:
    return f'<div class="demo-error" role="alert" data-request="{request}">⚠️ {html.escape(message)}</div>'


def preview(path: str | None) -> tuple[Any, str]:
    if not path:
        return None, ""
    try:
        return open_image(path), ""
    except ValueError as err:
        return None, _error(str(err))


def build_app(pool: SlotPool, methods: list[str] | None = None, repeats: int = 3) -> gr.Blocks:
    """The demo's Blocks, serving requests on ``pool`` (one model per concurrent request); timings are medians of
    ``repeats`` interleaved runs of each arm."""
    names = list(methods or list_methods())
    scene_dir = Path(tempfile.mkdtemp(prefix="vlm_accel_demo_scenes_"))
    with gr.Blocks(title="vlm_accel demo") as app:
        app.scene_dir = scene_dir  # launch() allows gradio to serve files from here
        gr.Markdown(INTRO + f"\nModel: `{pool.model_name}` on `{pool.device}`, {pool.size} concurrent slot(s).")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="scene seed", elem_id="scene-seed", min_width=80)
                    family = gr.Dropdown(list(FAMILY_CHOICES), value="any", label="question family", min_width=80)
                with gr.Row():
                    draw_seed = gr.Button("Draw scene #seed", elem_id="draw-seed", size="sm")
                    draw_random = gr.Button("Random scene", elem_id="draw-random", size="sm")
                shown = gr.Image(label="image", type="pil", interactive=False, height=256, elem_id="preview")
                truth = gr.Markdown("", elem_id="truth")
                question = gr.Textbox(label=f"question (≤ {MAX_QUESTION_CHARS} characters)", elem_id="question",
                                      placeholder="what color is the circle ?")  # fmt: skip
            with gr.Column(scale=1):
                first = "fastv" if "fastv" in names else names[0]
                method_a = gr.Radio(names, value=first, label="method", elem_id="method-a")
                panels = {"a": _method_panels("a", names)}
                method_b = gr.Radio([NONE, *names], value=NONE, label="compose with (optional)", elem_id="method-b")
                panels["b"] = _method_panels("b", names)
                max_new = gr.Slider(1, 64, value=8, step=1, label="max new tokens", elem_id="max-new")
                run = gr.Button("Run", variant="primary", elem_id="run")
        status = gr.HTML("", elem_id="status")
        with gr.Row():
            with gr.Column():
                answer_base = gr.Textbox(label="unpatched answer", elem_id="answer-base", interactive=False)
                metrics_base = gr.Markdown("", elem_id="metrics-base")
            with gr.Column():
                answer_patched = gr.Textbox(label="patched answer", elem_id="answer-patched", interactive=False)
                metrics_patched = gr.Markdown("", elem_id="metrics-patched")
                kept = gr.Markdown("", elem_id="kept")
        overlay = gr.Image(label="what the method did", type="pil", interactive=False, elem_id="overlay")
        with gr.Row():
            layers = gr.Image(label="visual tokens per layer", type="pil", interactive=False, elem_id="layers")
            speed = gr.Image(label="speed and memory", type="pil", interactive=False, elem_id="speed")
        notes = gr.Markdown("", elem_id="notes")

        all_components = [c for slot in ("a", "b") for p in panels[slot] for c in p.components]
        for slot, picker in (("a", method_a), ("b", method_b)):
            groups = [p.group for p in panels[slot] if p.group is not None]
            names_with_group = [p.name for p in panels[slot] if p.group is not None]

            def show(selected: str, _names=names_with_group):
                return [gr.update(visible=n == selected) for n in _names]

            picker.change(show, picker, groups)
            app.load(show, picker, groups)

        upload.change(preview, upload, [shown, status])
        draw_seed.click(lambda s, f: draw_scene(s, f, scene_dir), [seed, family], [upload, question, truth, status])

        def random_scene(f):
            s = random.randrange(2**31)
            return (s, *draw_scene(s, f, scene_dir))

        draw_random.click(random_scene, family, [seed, upload, question, truth, status])

        outputs = [status, answer_base, answer_patched, metrics_base, metrics_patched, kept, overlay, layers, speed,
                   notes]  # fmt: skip

        def handle(count, path, text, a, b, new_tokens, *values):
            count += 1  # per-session request number: the page (and the browser tests) can tell replies apart
            empty = ["", "", "", "", "", None, None, None, ""]
            try:
                image = open_image(path)
                configs = _configs(a, b if b != NONE else "", panels, list(values))
                result = run_request(pool, image, text, configs, int(new_tokens or 0), repeats)
            except (ValueError, TypeError, NotImplementedError) as err:  # NotImplementedError: a method that is not implemented
                return [count, _error(str(err), count), *empty]  # a method refuses at forward time
            except Exception as err:  # keep serving; the pool has already unpatched the slot
                logger.exception("demo request failed")
                return [count, _error(f"internal error: {type(err).__name__}: {err}", count), *empty]
            done = f'<div class="demo-ok" data-request="{count}">request {count}: done</div>'
            return [count, done, result.base.answer, result.patched.answer,
                    _metrics(result.base, "unpatched"), _metrics(result.patched, result.label), _kept_line(result),
                    pictures.overlay(result), pictures.layers_plot(result), pictures.speed_plot(result),
                    _method_notes(result)]  # fmt: skip

        requests = gr.State(0)
        run.click(handle, [requests, upload, question, method_a, method_b, max_new, *all_components],
                  [requests, *outputs],
                  concurrency_limit=pool.size, concurrency_id="model-slots")  # fmt: skip
    return app


CSS = """
.demo-error { background: #fde8e8; border: 1px solid #e02424; color: #9b1c1c; padding: 8px 12px; border-radius: 6px; }
.demo-ok { color: #046c4e; }
"""


def launch(app: gr.Blocks, port: int | None = None, host: str | None = None, block: bool = True) -> gr.Blocks:
    """Serve ``app`` without touching the network: no analytics, no share link, system fonts, no SSR."""
    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=None)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block,
               allowed_paths=[str(app.scene_dir)], theme=theme, css=CSS, ssr_mode=False, mcp_server=False,
               max_file_size="50mb")  # fmt: skip
    return app


def main_app(model: str | None = None, slots: int | None = None, device: str | None = None) -> gr.Blocks:
    """Build the app for ``model`` (default: ``$VLM_ACCEL_DEMO_MODEL`` or the bundled ``testbed-l``)."""
    import torch

    model = model or os.environ.get(MODEL_ENV) or "testbed-l"
    slots = slots or int(os.environ.get(SLOTS_ENV, "2"))
    device = device or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    return build_app(SlotPool(model, slots=slots, device=device))
