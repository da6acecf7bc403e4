// pybind11 module dwdp_ops._C: a thin boundary. Pointers and streams cross it as integers; Python owns arrays,
// validation of shapes and dtypes, and the lifecycle (python/dwdp_ops/runtime.py).
#include <optional>

#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "dwdp/check.h"
#include "dwdp/coaction.h"
#include "dwdp/dispatch.h"
#include "dwdp/fetch.h"
#include "dwdp/quant.h"
#include "dwdp/runtime.h"
#include "dwdp/vmm.h"

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
  m.def("p2p_native_atomics", &dwdp::p2p_native_atomics, py::arg("peer_bus_id"),
        "1 / 0: native atomics between this GPU and the peer (PCI bus id); -1: the peer is not visible here");
  m.def("pci_bus_id", &dwdp::pci_bus_id, "PCI bus id of this rank's GPU");
  m.def("stream_is_capturing", &dwdp::stream_is_capturing, py::arg("stream"));
  m.def("event_record", &dwdp::event_record, py::arg("event"), py::arg("stream"),
        "records a cudaEvent_t on a stream; inside a graph capture as an external record node (re-recorded by "
        "every replay)");
  m.def("barrier_all", &dwdp::barrier_all, py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_malloc", &dwdp::symmetric_malloc, py::arg("nbytes"), py::arg("alignment") = 256,
        py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_free", &dwdp::symmetric_free, py::arg("ptr"), py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_peer_ptr", &dwdp::symmetric_peer_ptr, py::arg("ptr"), py::arg("pe"));
  m.def("getmem", &dwdp::getmem, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("pe"), py::arg("stream"),
        py::arg("num_blocks"), py::arg("threads") = 512);
  m.def("register_symmetric", &dwdp::register_symmetric, py::arg("va"), py::arg("nbytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("register_unit", &dwdp::register_unit);
  m.def("unregister_symmetric", &dwdp::unregister_symmetric, py::arg("sym"), py::arg("nbytes"),
        py::call_guard<py::gil_scoped_release>());

  using U64 = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
  m.def(
      "ce_copy",
      [](U64 dsts, U64 srcs, U64 sizes, uintptr_t stream, bool batched) {
        if (dsts.ndim() != 1 || srcs.ndim() != 1 || sizes.ndim() != 1 || dsts.size() != srcs.size() ||
            dsts.size() != sizes.size())
          throw std::invalid_argument("ce_copy: dsts, srcs and sizes must be 1-D arrays of one length");
        py::gil_scoped_release release;
        dwdp::ce_copy(dsts.data(), srcs.data(), sizes.data(), static_cast<size_t>(dsts.size()), stream, batched);
      },
      py::arg("dsts"), py::arg("srcs"), py::arg("sizes"), py::arg("stream"), py::arg("batched"));
  m.def("fetch_experts", &dwdp::fetch_experts, py::arg("table"), py::arg("num_experts"), py::arg("num_tensors"),
        py::arg("ids"), py::arg("count_dev"), py::arg("count_cap"), py::arg("chunk"), py::arg("max_chunks"),
        py::arg("err"), py::arg("first"), py::arg("peer_ptr"), py::arg("num_blocks"), py::arg("threads"),
        py::arg("stream"));
  m.def("pack_experts", &dwdp::pack_experts, py::arg("dst"), py::arg("dst_stride"), py::arg("src_table"),
        py::arg("nbytes"), py::arg("n"), py::arg("stream"));
  m.attr("EXPERT_COPY_BYTES") = sizeof(dwdp::ExpertCopy);

  auto dims = [](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent,
                 bool paper) {
    if (din.size() != dout.size() || din.empty() || din.size() > static_cast<size_t>(dwdp::kCoMaxLayers))
      throw std::invalid_argument("co-action: 1 to 8 layers, din and dout of one length");
    dwdp::CoActionDims d{};
    d.num_layers = static_cast<int>(din.size());
    d.orders = orders;
    d.bias = bias;
    d.order_independent = order_independent;
    d.paper = paper;
    for (size_t l = 0; l < din.size(); ++l) {
      d.din[l] = din[l];
      d.dout[l] = dout[l];
      d.order_width += din[l] * dout[l] + (bias ? dout[l] : 0);
      d.out_per_order += dout[l];
    }
    d.ind_dim = d.order_width * (order_independent ? orders : 1);
    return d;
  };
  auto rows_of = [](std::vector<uint64_t> bases, std::vector<uint64_t> grads, int64_t rows_per_shard,
                    int64_t num_rows, uintptr_t feed_ids, int64_t feed_rows) {
    DWDP_REQUIRE(!bases.empty() && bases.size() <= static_cast<size_t>(dwdp::kCoMaxShards),
                 "co-action: 1 to " << dwdp::kCoMaxShards << " table shards, got " << bases.size());
    DWDP_REQUIRE(grads.empty() || grads.size() == bases.size(), "co-action: one gradient address per shard");
    dwdp::CoActionRows r{};
    r.shards = static_cast<int>(bases.size());
    r.rows_per_shard = rows_per_shard;
    r.num_rows = num_rows;
    r.feed_rows = feed_ids ? feed_rows : 0;
    for (size_t i = 0; i < bases.size(); ++i) {
      r.base[i] = bases[i];
      r.grad[i] = grads.empty() ? 0 : grads[i];
    }
    return r;
  };
  m.def(
      "coaction_forward",
      [dims, rows_of](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent,
                      bool paper, int dtype, int B, int T, std::vector<uint64_t> bases, int64_t rows_per_shard,
                      int64_t num_rows, uintptr_t ind_ids, uintptr_t feed, uintptr_t feed_ids, int64_t feed_rows,
                      uintptr_t mask, uintptr_t out, uintptr_t stream, bool check_ids,
                      std::vector<uint64_t> zero_ptrs, std::vector<int64_t> zero_floats) {
        const auto d = dims(din, dout, orders, bias, order_independent, paper);
        const auto r = rows_of(bases, {}, rows_per_shard, num_rows, feed_ids, feed_rows);
        if (zero_ptrs.size() > 2 || zero_ptrs.size() != zero_floats.size())
          throw std::invalid_argument("coaction_forward: at most two arrays to zero, an address and a count each");
        dwdp::CoActionZero z;
        for (size_t i = 0; i < zero_ptrs.size(); ++i) {
          if (zero_floats[i] < 0) throw std::invalid_argument("coaction_forward: a negative count to zero");
          // the forward adds both counts and multiplies by 4 bytes (int64): a count past this had wrapped
          if (zero_floats[i] > INT64_MAX / 8)
            throw std::invalid_argument("coaction_forward: zero_floats " + std::to_string(zero_floats[i]) +
                                        " is more floats than an address space holds");
          z.ptr[i] = zero_ptrs[i];
          z.n[i] = zero_floats[i];
        }
        // the GIL is released only to wait for the check (and what the stream ran before it); a call that only
        // launches keeps it (handing it to another thread costs more than the launches take)
        std::optional<py::gil_scoped_release> release;
        if (check_ids) release.emplace();
        return dwdp::coaction_forward(d, dtype, B, T, r, ind_ids, feed, feed_ids, mask, out, stream, check_ids, z);
      },
      "fused forward; with check_ids the ids' range check runs first on the stream and its bits are returned (0: in "
      "range) once it has finished, the forward already launched behind it; zero_ptrs / zero_floats: float32 arrays "
      "the call zeroes (a later backward's gradients)");
  m.def(
      "coaction_backward",
      [dims, rows_of](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent,
                      bool paper, int dtype, int B, int T, std::vector<uint64_t> bases, std::vector<uint64_t> grads,
                      int64_t rows_per_shard, int64_t num_rows, uintptr_t ind_ids, uintptr_t feed,
                      uintptr_t feed_ids, int64_t feed_rows, uintptr_t mask, uintptr_t grad_out,
                      uintptr_t grad_feed, uintptr_t stream) {
        dwdp::coaction_backward(dims(din, dout, orders, bias, order_independent, paper), dtype, B, T,
                                rows_of(bases, grads, rows_per_shard, num_rows, feed_ids, feed_rows), ind_ids, feed,
                                feed_ids, mask, grad_out, grad_feed, stream);
      });
  // The shape queries run without a GPU; their flags are not converted (backward=2 or bias=None had been taken as a
  // flag without a word) and every argument is named in a refusal.
  m.def("coaction_launch_shape",
        [dims](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent, bool paper,
               bool backward) {
          int warps;
          size_t smem;
          dwdp::coaction_launch_shape(dims(din, dout, orders, bias, order_independent, paper), backward, &warps, &smem);
          return py::make_tuple(warps, smem);
        },
        py::arg("din"), py::arg("dout"), py::arg("orders"), py::arg("bias").noconvert(),
        py::arg("order_independent").noconvert(), py::arg("paper").noconvert(), py::arg("backward").noconvert());
  m.def("coaction_fast_path",
        [dims](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent, bool paper,
               bool backward) {
          int warps;
          size_t smem;
          bool fast;
          dwdp::coaction_launch_shape(dims(din, dout, orders, bias, order_independent, paper), backward, &warps, &smem,
                                      &fast);
          return fast;
        },
        py::arg("din"), py::arg("dout"), py::arg("orders"), py::arg("bias").noconvert(),
        py::arg("order_independent").noconvert(), py::arg("paper").noconvert(), py::arg("backward").noconvert(),
        "whether the register (fast) kernels take this shape; else the shared-memory fallback (or nothing fits)");
  m.def("coaction_specialized",
        [dims](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent, bool paper,
               bool backward) {
          return dwdp::coaction_specialized(dims(din, dout, orders, bias, order_independent, paper), backward);
        },
        py::arg("din"), py::arg("dout"), py::arg("orders"), py::arg("bias").noconvert(),
        py::arg("order_independent").noconvert(), py::arg("paper").noconvert(), py::arg("backward").noconvert(),
        "whether the specialised kernels (compile-time widths) take this shape; DWDP_COACTION_SPECIALIZED=0: never");
  m.def("coaction_split_warps",
        [dims](std::vector<int> din, std::vector<int> dout, int orders, bool bias, bool order_independent, bool paper,
               bool backward, int elem, int B, int T, int sms, int forced) {
          return dwdp::coaction_split_warps(dims(din, dout, orders, bias, order_independent, paper), backward, elem, B,
                                            T, sms, forced);
        },
        py::arg("din"), py::arg("dout"), py::arg("orders"), py::arg("bias").noconvert(),
        py::arg("order_independent").noconvert(), py::arg("paper").noconvert(), py::arg("backward").noconvert(),
        py::arg("elem"), py::arg("B"), py::arg("T"), py::arg("sms"), py::arg("forced"),
        "warps a sample the specialised forward / backward takes (0: not specialised); forced -1 reads "
        "DWDP_COACTION_SPLIT");
  m.def(
      "coaction_check_ids",
      [](uintptr_t ind_ids, int64_t n_ind, int64_t ind_rows, uintptr_t feed_ids, int64_t n_feed, int64_t feed_rows,
         uintptr_t stream, uintptr_t feed_mask) {
        py::gil_scoped_release release;  // waits for the check
        return dwdp::coaction_check_ids(ind_ids, n_ind, ind_rows, feed_ids, n_feed, feed_rows, stream, feed_mask);
      },
      py::arg("ind_ids"), py::arg("n_ind"), py::arg("ind_rows"), py::arg("feed_ids"), py::arg("n_feed"),
      py::arg("feed_rows"), py::arg("stream"), py::arg("feed_mask") = 0,
      "range check of table ids on the stream, the host waiting for it: bit 0 ind_ids bad, bit 1 feed_ids bad (those "
      "where feed_mask, a float32 [B, T] mask, is 0 not checked)");

  // Token dispatch: the geometry and buffer addresses travel as a dict (python/dwdp_ops/dispatch.py builds it).
  auto dispatch_args = [](const py::dict& d) {
    dwdp::DispatchArgs a{};
    auto i = [&](const char* k) { return d[k].cast<long long>(); };
    a.rank = i("rank"); a.world = i("world"); a.hidden = i("hidden"); a.top_k = i("top_k");
    a.num_experts = i("num_experts"); a.experts_per_rank = i("experts_per_rank"); a.stride = i("stride");
    a.max_tokens = i("max_tokens"); a.max_pairs = i("max_pairs"); a.align = i("align"); a.ids_int64 = i("ids_int64");
    a.num_blocks = i("num_blocks"); a.threads = i("threads"); a.spin_budget = i("spin_budget");
    auto arr = [&](const char* k, uint64_t* out) {
      auto v = d[k].cast<std::vector<uint64_t>>();
      DWDP_REQUIRE(static_cast<int>(v.size()) == a.world && a.world <= dwdp::kDispatchMaxRanks,
                   "dispatch: " << k << " needs one address per rank");
      for (size_t r = 0; r < v.size(); ++r) out[r] = v[r];
    };
    arr("recv_x", a.recv_x); arr("recv_meta", a.recv_meta); arr("recv_w", a.recv_w);
    arr("recv_count", a.recv_count); arr("comb", a.comb); arr("flags", a.flags);
    a.send_pos = i("send_pos"); a.send_count = i("send_count"); a.expert_count = i("expert_count");
    a.offs = i("offs"); a.pair_pos = i("pair_pos"); a.x_grouped = i("x_grouped"); a.epoch = i("state");
    return a;
  };
  m.def("dispatch_tokens", [dispatch_args](const py::dict& args, uintptr_t x, uintptr_t ids, uintptr_t w, int T,
                                           uintptr_t stream) {
    dwdp::dispatch_tokens(dispatch_args(args), x, ids, w, T, stream);
  });
  m.def("combine_tokens", [dispatch_args](const py::dict& args, uintptr_t y, uintptr_t out, int T, uintptr_t stream) {
    dwdp::combine_tokens(dispatch_args(args), y, out, T, stream);
  });
  m.attr("DISPATCH_STATE_BYTES") = 24;

  m.def("vmm_granularity", &dwdp::vmm_granularity, py::arg("device"));
  m.def("vmm_create", &dwdp::vmm_create, py::arg("nbytes"), py::arg("device"));
  m.def("vmm_release", &dwdp::vmm_release, py::arg("handle"));
  m.def("vmm_reserve", &dwdp::vmm_reserve, py::arg("nbytes"), py::arg("alignment") = 0);
  m.def("vmm_free", &dwdp::vmm_free, py::arg("va"), py::arg("nbytes"));
  m.def("vmm_map", &dwdp::vmm_map, py::arg("va"), py::arg("nbytes"), py::arg("handle"), py::arg("offset"),
        py::arg("device"));
  m.def("vmm_unmap", &dwdp::vmm_unmap, py::arg("va"), py::arg("nbytes"));

  dwdp::register_quant(m);  // fp8 activation quantisation (cpp/src/quant_bindings.cpp)
}
