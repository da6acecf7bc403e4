// NVSHMEM lifecycle: unique-ID bootstrap, init/finalize, symmetric heap. See dwdp/runtime.h for the invariants.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "dwdp/check.h"
#include "dwdp/runtime.h"

namespace dwdp {
namespace {

std::mutex g_mu;
int g_device = -1;
bool g_initialized = false;
bool g_finalized = false;

void require_device(int device) {
  auto [count, why] = cuda_device_count();
  if (count == 0) throw std::runtime_error("no CUDA GPU is usable: " + why);
  DWDP_REQUIRE(device >= 0 && device < count,
               "device " << device << " does not exist: " << count << " CUDA device(s) are visible");
}

}  // namespace

void require_initialized(const char* what) {
  if (g_finalized) throw std::runtime_error(std::string(what) + ": the NVSHMEM runtime was finalized");
  if (!g_initialized) throw std::runtime_error(std::string(what) + ": the NVSHMEM runtime is not initialized");
}

std::pair<int, std::string> cuda_device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not confused by it
    return {0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
  }
  return {n, n == 0 ? "no CUDA device found" : ""};
}

std::string nvshmem_version() {
  return std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." + std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) + "." +
         std::to_string(NVSHMEM_VENDOR_PATCH_VERSION);
}

size_t unique_id_size() { return sizeof(nvshmemx_uniqueid_t); }

std::string get_unique_id(int device) {
  require_device(device);
  DeviceGuard guard(device);
  DWDP_CUDA_CHECK(cudaFree(nullptr));  // a live runtime context before NVSHMEM touches CUDA
  nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  int rc = nvshmemx_get_uniqueid(&uid);
  if (rc != 0) throw std::runtime_error("nvshmemx_get_uniqueid failed with status " + std::to_string(rc));
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

void init(const std::string& uid, int rank, int world_size, int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_finalized) throw std::runtime_error("init: NVSHMEM was finalized in this process and cannot start again");
  if (g_initialized) throw std::runtime_error("init: NVSHMEM is already initialized by dwdp_ops in this process");
  DWDP_REQUIRE(world_size >= 1, "world_size must be >= 1, got " << world_size);
  DWDP_REQUIRE(rank >= 0 && rank < world_size, "rank must be in [0, " << world_size << "), got " << rank);
  DWDP_REQUIRE(uid.size() == sizeof(nvshmemx_uniqueid_t),
               "unique id must be " << sizeof(nvshmemx_uniqueid_t) << " bytes, got " << uid.size());
  require_device(device);
  // The device is selected for the lifetime of the process on purpose: NVSHMEM binds a PE to the device that is
  // current at init.
  DWDP_CUDA_CHECK(cudaSetDevice(device));
  DWDP_CUDA_CHECK(cudaFree(nullptr));
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, uid.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int rc = nvshmemx_set_attr_uniqueid_args(rank, world_size, &id, &attr);
  if (rc != 0) throw std::runtime_error("nvshmemx_set_attr_uniqueid_args failed with status " + std::to_string(rc));
  rc = nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
  if (rc != 0) throw std::runtime_error("nvshmemx_init_attr failed with status " + std::to_string(rc));
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != world_size) {
    std::ostringstream os;
    os << "NVSHMEM was already initialised in this process with another world: PE " << nvshmem_my_pe() << " of "
       << nvshmem_n_pes() << ", requested " << rank << " of " << world_size;
    nvshmem_finalize();
    throw std::runtime_error(os.str());
  }
  g_device = device;
  g_initialized = true;
}

void finalize() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_initialized) return;
  {
    DeviceGuard guard(g_device);
    cudaDeviceSynchronize();
    nvshmem_finalize();
  }
  g_initialized = false;
  g_finalized = true;
  g_device = -1;  // kernels launched after finalize find no runtime (require_initialized) instead of a stale device
}

int init_status() { return nvshmemx_init_status(); }

int my_pe() {
  require_initialized("my_pe");
  return nvshmem_my_pe();
}

int n_pes() {
  require_initialized("n_pes");
  return nvshmem_n_pes();
}

int device() { return g_device; }

int p2p_native_atomics(const std::string& peer_bus_id) {
  require_initialized("p2p_native_atomics");
  int peer = -1;
  if (cudaDeviceGetByPCIBusId(&peer, peer_bus_id.c_str()) != cudaSuccess) {
    cudaGetLastError();
    return -1;  // the peer's GPU is not visible to this process: nothing can be asked about it
  }
  if (peer == g_device) return 1;
  int v = 0;
  DWDP_CUDA_CHECK(cudaDeviceGetP2PAttribute(&v, cudaDevP2PAttrNativeAtomicSupported, g_device, peer));
  return v;
}

std::string pci_bus_id() {
  require_initialized("pci_bus_id");
  char buf[64] = {0};
  DWDP_CUDA_CHECK(cudaDeviceGetPCIBusId(buf, sizeof(buf), g_device));
  return std::string(buf);
}

bool stream_is_capturing(uintptr_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  DWDP_CUDA_CHECK(cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &st));
  return st == cudaStreamCaptureStatusActive;
}

void event_record(uintptr_t event, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto e = reinterpret_cast<cudaEvent_t>(event);
  // Inside a capture a plain record only orders the capture; an external record becomes a graph node that
  // records the event again at every replay, so eager work after replays can wait for them.
  DWDP_CUDA_CHECK(stream_is_capturing(stream) ? cudaEventRecordWithFlags(e, s, cudaEventRecordExternal)
                                              : cudaEventRecord(e, s));
}

void barrier_all() {
  require_initialized("barrier_all");
  DeviceGuard guard(g_device);
  DWDP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_barrier_all();
}

uintptr_t symmetric_malloc(size_t bytes, size_t alignment) {
  require_initialized("symmetric_malloc");
  DWDP_REQUIRE(bytes > 0, "symmetric allocation of 0 bytes");
  DWDP_REQUIRE(alignment > 0 && (alignment & (alignment - 1)) == 0, "alignment must be a power of two, got " << alignment);
  DeviceGuard guard(g_device);
  void* p = nvshmem_align(alignment, bytes);
  if (p == nullptr)
    throw std::runtime_error("nvshmem_align(" + std::to_string(alignment) + ", " + std::to_string(bytes) +
                             ") returned NULL: the symmetric heap is exhausted (raise NVSHMEM_SYMMETRIC_SIZE or "
                             "dwdp_ops.init(heap_size=...))");
  return reinterpret_cast<uintptr_t>(p);
}

void symmetric_free(uintptr_t ptr) {
  require_initialized("symmetric_free");
  DeviceGuard guard(g_device);
  DWDP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_free(reinterpret_cast<void*>(ptr));
}

uintptr_t symmetric_peer_ptr(uintptr_t ptr, int pe) {
  require_initialized("peer_ptr");
  DWDP_REQUIRE(pe >= 0 && pe < nvshmem_n_pes(), "pe must be in [0, " << nvshmem_n_pes() << "), got " << pe);
  return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<const void*>(ptr), pe));
}

size_t register_unit() {
  // NVSHMEM maps registered buffers in units of its VMM granularity (NVSHMEM_CUMEM_GRANULARITY, 512 MiB by
  // default); a buffer that is not a multiple makes NVSHMEM fail inside and end the process, so it is refused here.
  // A value that is not a whole number of bytes >= 1 (a number with an optional k / m / g) is refused: 0.5 had made
  // a unit of 0 (register_symmetric's bytes % unit: a division by zero that ended the process), "abc" had been
  // taken as the default and 1e30 overflowed the conversion.
  size_t unit = size_t(512) << 20;
  const char* env = std::getenv("NVSHMEM_CUMEM_GRANULARITY");
  if (env && *env) {  // (set but empty: as unset)
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    double mult = 1;
    if (end != env && (*end == 'k' || *end == 'K')) mult = 1024.0, ++end;
    else if (end != env && (*end == 'm' || *end == 'M')) mult = 1048576.0, ++end;
    else if (end != env && (*end == 'g' || *end == 'G')) mult = 1073741824.0, ++end;
    const double bytes = v * mult;
    DWDP_REQUIRE(end != env && *end == '\0' && bytes >= 1 && bytes <= 1099511627776.0 && bytes == std::floor(bytes),
                 "NVSHMEM_CUMEM_GRANULARITY=" << env << " is not a size of at least one byte and at most 1 TiB (a "
                 "whole number of bytes, optionally with k, m or g); unset it (dwdp_ops.init sets 2 MiB)");
    unit = static_cast<size_t>(bytes);
  }
  return unit;
}

uintptr_t register_symmetric(uintptr_t va, size_t bytes) {
  require_initialized("register_symmetric");
  const size_t unit = register_unit();
  DWDP_REQUIRE(bytes > 0 && bytes % unit == 0,
               "register_symmetric: " << bytes << " bytes is not a positive multiple of " << unit
                                      << " bytes (NVSHMEM_CUMEM_GRANULARITY), which NVSHMEM needs for user buffers");
  DeviceGuard guard(g_device);
  void* sym = nvshmemx_buffer_register_symmetric(reinterpret_cast<void*>(va), bytes, 0);
  if (sym == nullptr)
    throw std::runtime_error("nvshmemx_buffer_register_symmetric failed for " + std::to_string(bytes) +
                             " bytes (the buffer must be a cuMemCreate allocation with a POSIX-FD handle)");
  return reinterpret_cast<uintptr_t>(sym);
}

void unregister_symmetric(uintptr_t sym, size_t bytes) {
  require_initialized("unregister_symmetric");
  DeviceGuard guard(g_device);
  DWDP_CUDA_CHECK(cudaDeviceSynchronize());
  int rc = nvshmemx_buffer_unregister_symmetric(reinterpret_cast<void*>(sym), bytes);
  if (rc != 0) throw std::runtime_error("nvshmemx_buffer_unregister_symmetric failed with status " + std::to_string(rc));
}

}  // namespace dwdp
