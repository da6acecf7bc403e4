// CUDA VMM through driver entry points. Each entry point is resolved once, on first use.
#include "dwdp/vmm.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "dwdp/check.h"

namespace dwdp {
namespace {

template <typename Fn>
Fn entry(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status{};
  cudaError_t err = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &status);
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || fn == nullptr)
    throw std::runtime_error(std::string("CUDA driver entry point ") + name + " is unavailable (" +
                             cudaGetErrorString(err) + "): a driver for CUDA 12 or newer is required");
  return reinterpret_cast<Fn>(fn);
}

void check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  static auto get_str = entry<CUresult (*)(CUresult, const char**)>("cuGetErrorString");
  const char* s = "unknown";
  get_str(r, &s);
  throw std::runtime_error(std::string(what) + " failed: " + s + " (CUresult " + std::to_string(int(r)) + ")");
}

CUmemAllocationProp prop_for(int device) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

}  // namespace

size_t vmm_granularity(int device) {
  static auto fn = entry<CUresult (*)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags)>(
      "cuMemGetAllocationGranularity");
  CUmemAllocationProp prop = prop_for(device);
  size_t g = 0;
  check(fn(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), "cuMemGetAllocationGranularity");
  return g;
}

uint64_t vmm_create(size_t bytes, int device) {
  static auto fn = entry<CUresult (*)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                                      unsigned long long)>("cuMemCreate");
  const size_t g = vmm_granularity(device);
  DWDP_REQUIRE(bytes > 0 && bytes % g == 0, "vmm_create: size " << bytes << " is not a positive multiple of the "
                                                                << g << "-byte granularity");
  CUmemAllocationProp prop = prop_for(device);
  CUmemGenericAllocationHandle h = 0;
  check(fn(&h, bytes, &prop, 0), "cuMemCreate");
  return static_cast<uint64_t>(h);
}

void vmm_release(uint64_t handle) {
  static auto fn = entry<CUresult (*)(CUmemGenericAllocationHandle)>("cuMemRelease");
  check(fn(static_cast<CUmemGenericAllocationHandle>(handle)), "cuMemRelease");
}

uintptr_t vmm_reserve(size_t bytes, size_t alignment) {
  static auto fn =
      entry<CUresult (*)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long)>("cuMemAddressReserve");
  DWDP_REQUIRE(bytes > 0, "vmm_reserve: size must be positive");
  CUdeviceptr va = 0;
  check(fn(&va, bytes, alignment, 0, 0), "cuMemAddressReserve");
  return static_cast<uintptr_t>(va);
}

void vmm_free(uintptr_t va, size_t bytes) {
  static auto fn = entry<CUresult (*)(CUdeviceptr, size_t)>("cuMemAddressFree");
  check(fn(static_cast<CUdeviceptr>(va), bytes), "cuMemAddressFree");
}

void vmm_map(uintptr_t va, size_t bytes, uint64_t handle, size_t offset, int device) {
  static auto map = entry<CUresult (*)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                                       unsigned long long)>("cuMemMap");
  static auto access =
      entry<CUresult (*)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t)>("cuMemSetAccess");
  check(map(static_cast<CUdeviceptr>(va), bytes, offset, static_cast<CUmemGenericAllocationHandle>(handle), 0),
        "cuMemMap");
  CUmemAccessDesc desc = {};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = device;
  desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const CUresult r = access(static_cast<CUdeviceptr>(va), bytes, &desc, 1);
  if (r != CUDA_SUCCESS) {
    // Undo the mapping before raising: a caller records an unmap only for a vmm_map that returned, and a mapping
    // left behind keeps the allocation's memory alive after vmm_release and makes vmm_free of the range fail.
    static auto unmap = entry<CUresult (*)(CUdeviceptr, size_t)>("cuMemUnmap");
    unmap(static_cast<CUdeviceptr>(va), bytes);
    check(r, "cuMemSetAccess");
  }
}

void vmm_unmap(uintptr_t va, size_t bytes) {
  static auto fn = entry<CUresult (*)(CUdeviceptr, size_t)>("cuMemUnmap");
  check(fn(static_cast<CUdeviceptr>(va), bytes), "cuMemUnmap");
}

}  // namespace dwdp
