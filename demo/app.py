"""Hugging Face Space entry point: the vlm_accel demo (the same app as ``vlm-accel demo``).

Model: ``$VLM_ACCEL_DEMO_MODEL`` (default: the bundled ``testbed-l``, CPU, offline); concurrent slots:
``$VLM_ACCEL_DEMO_SLOTS`` (default 2). See README.md here for the Space card and the project README ("Demo").
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from vlm_accel.demo.app import launch, main_app  # noqa: E402

demo = main_app()

if __name__ == "__main__":
    launch(demo, host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"), port=int(os.environ.get("PORT", "7860")))
