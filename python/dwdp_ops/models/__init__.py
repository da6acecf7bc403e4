"""Models built on dwdp_ops ops: ``can`` (CAN-DNN and its DNN baseline, data loaders)."""
