"""The Gradio demo: unpatched vs patched model side by side (``vlm-accel demo``; ``demo/app.py`` for a Space).

- :mod:`vlm_accel.demo.controls` — UI controls generated from each method's config dataclass;
- :mod:`vlm_accel.demo.runner` — a pool of model slots and one request run unpatched and patched;
- :mod:`vlm_accel.demo.pictures` — the overlays and plots;
- :mod:`vlm_accel.demo.app` — the Gradio Blocks (imports gradio; install the ``demo`` extra).
"""
