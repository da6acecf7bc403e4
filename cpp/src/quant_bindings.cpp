// Python bindings of the fp8 activation quantisation kernels (dwdp/quant.h), registered from bindings.cpp. Pointers
// and streams cross as integers; python/dwdp_ops/models/deepseek_r1/fp8.py allocates the outputs and checks dtypes.
#include <pybind11/pybind11.h>

#include "dwdp/quant.h"

namespace py = pybind11;

namespace dwdp {

void register_quant(py::module_& m) {
  m.def("quant_rows_bf16", &quant_rows_bf16, py::arg("x"), py::arg("x_stride"), py::arg("q"), py::arg("scale"),
        py::arg("rows"), py::arg("k"), py::arg("device"), py::arg("stream"), py::arg("live_rows") = 0,
        "x [rows, k] bf16 (row stride x_stride elements) -> q [rows, k] float8_e4m3fn, scale [rows] float32 per row "
        "(amax / 448, 1 for a zero row; q = x / scale rounded to nearest even, saturated): enqueued on stream; "
        "live_rows: 0 or a device int32 bounding the rows processed (the rest neither read nor written)");
  m.def("swiglu_quant_bf16", &swiglu_quant_bf16, py::arg("h"), py::arg("h_stride"), py::arg("q"), py::arg("scale"),
        py::arg("rows"), py::arg("inter"), py::arg("device"), py::arg("stream"), py::arg("live_rows") = 0,
        "h [rows, 2 inter] bf16 -> quant_rows_bf16 of bf16 silu(h[:, :inter]) * h[:, inter:] (PyTorch's rounding): "
        "enqueued on stream");
  m.attr("QUANT_MAX_K") = kQuantMaxK;
}

}  // namespace dwdp
