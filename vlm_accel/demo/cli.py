"""``vlm-accel demo``: serve the Gradio demo locally (the same app as ``demo/app.py`` on a Space)."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="serve the Gradio demo: unpatched vs patched side by side (needs the demo extra)",
        description=__doc__,
    )  # fmt: skip
    parser.add_argument("--model", default=None,
                        help="testbed-l (default; offline, CPU), testbed-s, a trained testbed directory or any "
                             "supported checkpoint; also $VLM_ACCEL_DEMO_MODEL")  # fmt: skip
    parser.add_argument("--slots", type=int, default=None,
                        help="model instances = concurrent requests (default 2; $VLM_ACCEL_DEMO_SLOTS)")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve a network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        from vlm_accel.demo.app import launch, main_app
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "gradio":
            raise SystemExit("vlm-accel demo needs gradio: pip install 'vlm-accel[demo]'") from None
        raise
    if args.slots is not None and args.slots < 1:
        raise SystemExit(f"--slots must be >= 1, got {args.slots}")
    app = main_app(args.model, args.slots, args.device)
    launch(app, port=args.port, host=args.host, block=False)
    print(f"vlm-accel demo: serving at {app.local_url} ({time.perf_counter() - start:.1f} s after the command "
          "started its imports); Ctrl+C stops it", flush=True)  # fmt: skip
    app.block_thread()
    return 0
