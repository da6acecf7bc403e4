// pybind11 module dwdp_ops._C: a thin boundary. Pointers and streams cross it as integers; Python owns arrays,
// validation of shapes and dtypes, and the lifecycle (python/dwdp_ops/runtime.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dwdp/fetch.h"
#include "dwdp/runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dwdp_ops native core: NVSHMEM runtime and fetch kernels";
  m.attr("__version__") = DWDP_VERSION;

  m.def("cuda_device_count", &dwdp::cuda_device_count,
        "(count, reason): CUDA devices visible; count 0 with the runtime's reason when there is no GPU or driver");
  m.def("nvshmem_version", &dwdp::nvshmem_version, "NVSHMEM header version this module was built with");
  m.def("unique_id_size", &dwdp::unique_id_size);
  m.def(
      "get_unique_id",
      [](int device) {
        std::string uid;
        {
          py::gil_scoped_release release;  // the bytes object below is built with the GIL held
          uid = dwdp::get_unique_id(device);
        }
        return py::bytes(uid);
      },
      py::arg("device"));
  m.def(
      "init", [](py::bytes uid, int rank, int world_size, int device) {
        std::string s = uid;
        py::gil_scoped_release release;
        dwdp::init(s, rank, world_size, device);
      },
      py::arg("uid"), py::arg("rank"), py::arg("world_size"), py::arg("device"));
  m.def("finalize", &dwdp::finalize, py::call_guard<py::gil_scoped_release>());
  m.def("init_status", &dwdp::init_status);
  m.def("my_pe", &dwdp::my_pe);
  m.def("n_pes", &dwdp::n_pes);
  m.def("device", &dwdp::device);
  m.def("barrier_all", &dwdp::barrier_all, py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_malloc", &dwdp::symmetric_malloc, py::arg("nbytes"), py::arg("alignment") = 256,
        py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_free", &dwdp::symmetric_free, py::arg("ptr"), py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_peer_ptr", &dwdp::symmetric_peer_ptr, py::arg("ptr"), py::arg("pe"));
  m.def("getmem", &dwdp::getmem, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("pe"), py::arg("stream"),
        py::arg("num_blocks"), py::arg("threads") = 512);
}
