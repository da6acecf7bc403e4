"""``python -m dwdp_ops <command>``: ``info`` prints what this machine offers dwdp_ops; ``can-train`` trains CAN-DNN
and the DNN baseline (numpy reference ops) and reports AUC per epoch."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def info() -> dict:
    from . import __version__
    from ._native import native

    c = native()
    count, why = c.cuda_device_count()
    out = {
        "dwdp_ops": __version__,
        "python": platform.python_version(),
        "nvshmem_headers": c.nvshmem_version(),
        "cuda_devices": count,
    }
    if count == 0:
        out["why_no_gpu"] = why
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except ImportError:
        out["cupy"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dwdp_ops")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, GPUs and NVSHMEM this install sees")
    p.add_argument("--json", action="store_true")
    sub.add_parser("can-train", help="train CAN-DNN and the DNN baseline (see can-train --help)", add_help=False)
    if argv is None:
        import sys as _sys

        argv = _sys.argv[1:]
    sub.add_parser("demo", help="DWDP on DeepSeek-R1 (see demo --help)", add_help=False)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "can-train":
        from .models.train_can import main as can_main

        return can_main(argv[1:])
    ns = ap.parse_args(argv)
    if ns.cmd == "info":
        data = info()
        if ns.json:
            print(json.dumps(data, indent=2))
        else:
            for k, v in data.items():
                print(f"{k:16s} {v}")
            if data["cuda_devices"] == 0:
                print("The kernels need NVIDIA GPUs; host-side planning and the CPU reference work here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
