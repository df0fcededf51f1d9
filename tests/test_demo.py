"""The demo's logic without a browser: config-driven controls, input checks, the attention probe, and the slot pool
under concurrent requests (measured against the same requests run alone)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_accel.config import MethodConfig, check_ratio
from vlm_accel.demo.controls import base_config, build_config, control_value, field_specs, parse_value
from vlm_accel.demo.runner import (
    MAX_QUESTION_CHARS,
    SlotPool,
    check_question,
    open_image,
    prepare_inputs,
    probe_attention,
    run_request,
)
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.registry import list_methods
from vlm_accel.testbed import make_dataset


@dataclass
class NewMethodConfig(MethodConfig):
    """A config the demo has never seen, with every field kind the controls must handle."""

    method_name: ClassVar[str] = "demo_test_new"
    flag: bool = True
    steps: int = 3
    ratio: float = 0.5
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    window: tuple[float, float] = (0.25, 1.0)
    sizes: tuple[int, ...] = (1, 2, 3)
    limit: int | None = None
    extra: Any = None
    model: Any = dataclasses.field(default_factory=torch.nn.Identity)

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scene():
    row = make_dataset(1, seed=20261202)[0]
    return row["image"], row["question"]


def test_controls_cover_every_field_kind():
    specs, notes = field_specs(NewMethodConfig())
    kinds = {s.name: (s.kind, s.optional) for s in specs}
    assert kinds == {
        "flag": ("bool", False), "steps": ("int", False), "ratio": ("float", False), "name": ("str", False),
        "mode": ("choice", False), "window": ("tuple", False), "sizes": ("tuple", False), "limit": ("int", True),
        "extra": ("json", True),
    }  # fmt: skip
    assert len(notes) == 1 and "model" in notes[0]  # a model object has no control: kept, and said so


def test_untouched_controls_rebuild_the_base_config():
    for config in [NewMethodConfig(), *(base_config(m) for m in list_methods())]:
        specs, _ = field_specs(config)
        rebuilt = build_config(config, specs, [control_value(s) for s in specs])
        for f in dataclasses.fields(config):  # == on values (a model object compares by identity)
            assert getattr(rebuilt, f.name) == getattr(config, f.name), (config.method_name, f.name)


def test_edited_controls_reach_the_config_and_bad_values_say_which_field():
    config = NewMethodConfig()
    specs, _ = field_specs(config)
    by_name = {s.name: s for s in specs}
    values = {s.name: control_value(s) for s in specs}
    values.update(flag=False, steps=7.0, ratio="0.1", mode="b", window="0.5, 0.75", sizes="4, 5", limit="9",
                  extra='{"k": [1]}')  # fmt: skip
    built = build_config(config, specs, [values[s.name] for s in specs])
    assert (built.flag, built.steps, built.ratio, built.mode, built.window, built.sizes, built.limit, built.extra) == (
        False, 7, 0.1, "b", (0.5, 0.75), (4, 5), 9, {"k": [1]}
    )  # fmt: skip
    assert built.model is config.model
    for name, bad, message in [("steps", 2.5, "whole number"), ("ratio", "abc", "number"), ("window", "1", "2 comma"),
                               ("mode", "c", "one of"), ("extra", "{", "JSON"), ("steps", "", "needs a value")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_value(by_name[name], bad)
    with pytest.raises(ValueError, match="ratio must be in"):  # the config's own range check
        build_config(config, specs, [1.5 if s.name == "ratio" else values[s.name] for s in specs])


def test_bad_images_and_questions_get_one_line_messages(tmp_path):
    with pytest.raises(ValueError, match="upload an image"):
        open_image(None)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        open_image(tmp_path / "notes.txt")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="1×1 pixels"):
        open_image(tmp_path / "tiny.png")
    Image.new("L", (8000, 8000)).save(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="8000×8000 pixels"):
        open_image(tmp_path / "huge.png")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png").size == (40, 30)
    for question in ("", "   ", None):
        with pytest.raises(ValueError, match="type a question"):
            check_question(question)
    with pytest.raises(ValueError, match=f"limit is {MAX_QUESTION_CHARS}"):
        check_question("a" * 10_000)


@pytest.fixture(scope="module")
def pool():
    return SlotPool("testbed-l", slots=1)


def test_attention_probe_matches_eager_attention_and_changes_nothing(pool, scene):
    """The probe (an identity row edit) reports exactly what eager attention computes, and leaves logits alone."""
    from vlm_accel.testbed import load_model

    with pool.acquire() as slot:
        inputs = prepare_inputs(slot, *scene)
        with torch.no_grad():
            reference_logits = slot.model(**inputs).logits
        maps = probe_attention(slot.model, inputs, [])
        with torch.no_grad():
            after_logits = slot.model(**inputs).logits
    torch.testing.assert_close(after_logits, reference_logits, rtol=0, atol=0)  # the probe is gone afterwards
    eager, _ = load_model("testbed-l")
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    visual = inputs["input_ids"][0] == eager.config.image_token_id
    assert sorted(maps) == list(range(len(attentions)))
    for layer, probs in enumerate(attentions):
        expected = probs[0, :, -1, visual].mean(dim=0).numpy()
        np.testing.assert_allclose(maps[layer], expected, rtol=1e-4, atol=1e-6)


def test_reweighting_moves_attention_onto_the_image(pool, scene):
    """PAI's z + α|z| raises every visual logit, so the image's share of attention rises wherever it acts."""
    result = run_request(pool, *scene, [base_config("pai")], max_new_tokens=2, repeats=1)
    assert result.patched.attention_layers, "PAI changed no layer"
    assert result.patched.attention.sum() > result.base.attention.sum()
    assert result.grid == 16 and result.base.attention.shape == (256,)


def test_noop_setting_reproduces_the_unpatched_arm(pool, scene):
    config = dataclasses.replace(base_config("fastv"), keep_ratio=1.0)
    result = run_request(pool, *scene, [config], max_new_tokens=3, repeats=1)
    assert result.patched.answer == result.base.answer
    assert result.patched.visual_per_layer == result.base.visual_per_layer == [256] * 8
    assert result.patched.kv_bytes == result.base.kv_bytes


def test_pruning_records_the_kept_tokens(pool, scene):
    result = run_request(pool, *scene, [base_config("fastv")], max_new_tokens=2, repeats=1)
    (layer, kept), = result.patched.stages
    assert layer == 2 and kept.shape == (256,) and int(kept.sum()) == 64  # ceil(0.25 × 256) from layer 2
    assert result.patched.visual_per_layer == [256, 256] + [64] * 6
    assert result.patched.kv_bytes < result.base.kv_bytes


def _signature(result) -> tuple:
    arms = (result.base, result.patched)
    return (
        result.label,
        tuple(a.answer for a in arms),
        tuple(tuple(a.visual_per_layer) for a in arms),
        tuple((layer, kept.tobytes()) for layer, kept in result.patched.stages),
        tuple(None if a.attention is None else np.round(a.attention, 6).tobytes() for a in arms),
    )


def test_concurrent_requests_never_see_each_others_patch(scene):
    """8 requests with different methods at once on 2 slots return exactly what each returns alone."""
    requests = []
    for name in list_methods():
        try:
            requests.append([base_config(name)])
        except MethodNotApplicable:
            continue
    requests.append([base_config("fastv"), base_config("pai")])  # composition too
    runnable = []
    alone_pool = SlotPool("testbed-l", slots=1)
    alone = {}
    for configs in requests:
        try:
            alone[len(runnable)] = _signature(run_request(alone_pool, *scene, configs, 3, repeats=1))
            runnable.append(configs)
        except MethodNotApplicable:  # e.g. paint on the 1-layer testbed vision tower
            continue
    assert len(runnable) >= 8
    shared = SlotPool("testbed-l", slots=2)
    with ThreadPoolExecutor(max_workers=len(runnable)) as executor:
        futures = [executor.submit(run_request, shared, *scene, configs, 3, 1) for configs in runnable]
        together = {i: _signature(f.result()) for i, f in enumerate(futures)}
    assert together == alone
    assert shared.busy_peak == 2  # both slots really served at once
    assert all(not hasattr(slot.model, "_vlm_accel_patch") for slot in list(shared._free.queue))


def test_bad_method_settings_leave_the_slot_unpatched(pool, scene):
    config = base_config("paint")  # needs a deeper vision tower than the testbed's
    with pytest.raises(MethodNotApplicable):
        run_request(pool, *scene, [config], max_new_tokens=2, repeats=1)
    with pytest.raises(ValueError, match="cannot be composed"):
        run_request(pool, *scene, [base_config("fastv"), base_config("pool")], max_new_tokens=2, repeats=1)
    result = run_request(pool, *scene, [base_config("fastv")], max_new_tokens=2, repeats=1)  # still serving
    assert result.patched.answer


def test_demo_subcommand_is_registered():
    from vlm_accel.cli import build_parser

    argv = ["demo", "--model", "testbed-s", "--slots", "3", "--port", "7999"]
    args = build_parser(argv).parse_args(argv)
    assert (args.command, args.model, args.slots, args.port) == ("demo", "testbed-s", 3, 7999)


def test_demo_command_serves_offline_on_cpu(tmp_path):
    """``vlm-accel demo`` starts with no network and no GPU and answers HTTP (time printed, not asserted)."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install '.[demo]'")
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "vlm_accel.cli", "demo", "--port", str(port), "--slots", "1"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = start + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                    assert reply.status == 200 and b"vlm_accel demo" in reply.read()
                    break
            except OSError:
                assert time.perf_counter() < deadline, "the demo did not start serving"
                time.sleep(0.5)
        served = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=30)
    import resource

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"vlm-accel demo served after {served:.1f} s wall, {cpu.ru_utime + cpu.ru_stime:.1f} s CPU (until stopped)")


def test_a_newly_registered_method_gets_its_controls_with_no_demo_change(pool):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install '.[demo]'")
    from vlm_accel import registry
    from vlm_accel.demo.app import build_app
    from vlm_accel.methods.base import Method

    class NewMethod(Method):
        config_cls = NewMethodConfig

    registry.register_method("demo_test_new", NewMethod)
    try:
        app = build_app(pool)
    finally:
        registry._REGISTRY.pop("demo_test_new")
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for name in ("flag", "steps", "ratio", "name", "mode", "window", "sizes", "limit", "extra"):
        assert f"param-a-demo_test_new-{name}" in ids and f"param-b-demo_test_new-{name}" in ids
    assert "param-a-demo_test_new-model" not in ids  # no control for a model object (a note instead)
    radio = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "method-a")
    assert "demo_test_new" in [choice[1] for choice in radio.choices]
