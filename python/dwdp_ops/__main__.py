"""``python -m dwdp_ops COMMAND``: ``info`` prints what this machine offers dwdp_ops; ``demo`` runs DWDP on
DeepSeek-R1; ``can-train`` trains CAN-DNN and the DNN baseline and reports AUC per epoch; ``launch`` runs a script as
N ranks (one per GPU); ``sim`` predicts DWDP against DEP on a context-only server (CPU only). Each command parses its
own options (``python -m dwdp_ops COMMAND --help``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def info() -> dict:
    """What this install offers: versions, the NVSHMEM built against and loaded, GPUs. Never raises for a missing
    ``_C``, NVSHMEM, CuPy, driver or GPU: the key ``native`` then holds the one-line reason."""
    from . import __version__
    from ._native import build_info, describe_cuda_error, loaded_nvshmem, native_or_reason
    from .versions import installed_nvshmem_wheels

    c, why_native = native_or_reason()
    built = build_info() or {}
    loaded = loaded_nvshmem()
    wheels = installed_nvshmem_wheels()
    out = {
        "dwdp_ops": __version__,
        "python": platform.python_version(),
        "native": "ok" if c is not None else f"unavailable: {why_native}",
        "nvshmem_headers": c.nvshmem_version() if c is not None else built.get("nvshmem_version"),
        "nvshmem_loaded": f"{loaded[0]} ({loaded[1]})" if loaded else None,
        "nvshmem_wheel": ", ".join(f"{d}=={v}" for d, v in sorted(wheels.items())) or None,
        "cuda_built": built.get("cuda_version") or None,
    }
    if c is not None:
        count, why = c.cuda_device_count()
        out["cuda_devices"] = count
        if count == 0:
            out["why_no_gpu"] = describe_cuda_error(why)
    else:
        out["cuda_devices"] = 0
        out["why_no_gpu"] = "dwdp_ops._C is unavailable (see native)"
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except ImportError:
        out["cupy"] = None
    return out


COMMANDS = {
    "info": "versions, GPUs and NVSHMEM this install sees",
    "demo": "DWDP on DeepSeek-R1: real model on 2+ GPUs, fetch plans and the numpy reference on CPU",
    "can-train": "train CAN-DNN and the DNN baseline, report test AUC per epoch",
    "launch": "run a script as N ranks on this node, one per GPU",
    "sim": "predict DWDP against DEP (iteration latency, TPS/GPU, per-category time) on CPU, no GPU needed",
}
PROG = "python -m dwdp_ops"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog=PROG, description="dwdp_ops: Distributed Weight Data Parallelism for MoE inference (CUDA + NVSHMEM).",
        epilog=f"'{PROG} COMMAND --help' shows the options of one command.")
    ap.add_argument("--version", action="version", version=f"dwdp_ops {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
    p = sub.add_parser("info", help=COMMANDS["info"], description=COMMANDS["info"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    for name in ("demo", "can-train", "launch", "sim"):  # parsed by their own main(), see main() below
        sub.add_parser(name, help=COMMANDS[name], add_help=False)
    return ap


def _delegate(name: str, argv: list[str]) -> int:
    prog = f"{PROG} {name}"
    if name == "demo":
        from .demo import main as demo_main

        return demo_main(argv, prog=prog)
    if name == "can-train":
        from .models.train_can import main as can_main

        return can_main(argv, prog=prog)
    if name == "sim":
        from .sim.cli import main as sim_main

        return sim_main(argv, prog=prog)
    from .launch import main as launch_main

    return launch_main(argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    """``python -m dwdp_ops COMMAND ...``: ``info`` here, the other commands in their own modules (each parses its
    own options, so ``demo --help`` shows the demo's). Without a command: the usage and a hint, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    if argv and argv[0] in ("demo", "can-train", "launch", "sim"):
        return _delegate(argv[0], argv[1:])
    if not argv:
        ap.print_help(sys.stderr)
        ap.exit(2, f"{PROG}: error: give a command ({', '.join(COMMANDS)}); for a start try '{PROG} info'\n")
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
    ap.error(f"give a command ({', '.join(COMMANDS)})")


if __name__ == "__main__":
    sys.exit(main())
