// Error checking and device-context helpers shared by every translation unit of dwdp_ops._C.
// Every failure becomes a C++ exception (std::runtime_error or std::invalid_argument), which pybind11 turns into a
// Python RuntimeError / ValueError; nothing in _C calls exit() or abort().
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dwdp {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  std::ostringstream os;
  os << what << " failed: " << cudaGetErrorString(err) << " (" << cudaGetErrorName(err) << ") at " << file << ":"
     << line;
  throw std::runtime_error(os.str());
}

#define DWDP_CUDA_CHECK(expr)                                                              \
  do {                                                                                     \
    cudaError_t dwdp_err_ = (expr);                                                        \
    if (dwdp_err_ != cudaSuccess) ::dwdp::throw_cuda(dwdp_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// Launch check: the launch itself (configuration errors), not the kernel's completion.
#define DWDP_LAUNCH_CHECK() DWDP_CUDA_CHECK(cudaGetLastError())

#define DWDP_REQUIRE(cond, msg)                  \
  do {                                           \
    if (!(cond)) {                               \
      std::ostringstream dwdp_os_;               \
      dwdp_os_ << msg;                           \
      throw std::invalid_argument(dwdp_os_.str()); \
    }                                            \
  } while (0)

// Sets the current device for the lifetime of the object and restores the caller's device afterwards
// (nvshmem4py does the same around every API call), so that a host framework's current device is never changed
// behind its back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DWDP_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) DWDP_CUDA_CHECK(cudaSetDevice(device));
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// The device that owns device memory at ptr (a kernel is launched there, whatever the caller's current device).
inline int device_of(uintptr_t ptr, const char* what) {
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) throw_cuda(err, what, __FILE__, __LINE__);
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    std::ostringstream os;
    os << what << ": address 0x" << std::hex << ptr << " is not device memory";
    throw std::invalid_argument(os.str());
  }
  return attr.device;
}

}  // namespace dwdp
