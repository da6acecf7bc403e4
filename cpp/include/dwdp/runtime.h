// NVSHMEM lifecycle owned by dwdp_ops._C.
//
// Invariants:
//  * nvshmemx_init_attr is called from this module (runtime.cu), so the NVSHMEM device state that our kernels read
//    is initialised even when another component initialised NVSHMEM first (the host library ref-counts).
//  * Every argument that would make NVSHMEM call exit() is checked here first and reported as an exception.
//  * One NVSHMEM world per process: after finalize() the runtime cannot be initialised again.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace dwdp {

// Number of CUDA devices, or 0 with the runtime's reason when there is no usable driver / GPU. Never throws.
std::pair<int, std::string> cuda_device_count();
// Compile-time NVSHMEM version "major.minor.patch" of the headers this module was built with.
std::string nvshmem_version();
size_t unique_id_size();
// Creates an NVSHMEM unique ID on `device` (rank 0 only); the bytes are sent to the other ranks out of band.
std::string get_unique_id(int device);
void init(const std::string& uid, int rank, int world_size, int device);
void finalize();
// nvshmemx_init_status(): 0 not initialised, 1 bootstrapped, 2 initialised, 3/4 multi-process-per-GPU modes.
int init_status();
int my_pe();
int n_pes();
int device();
// Throws unless init() succeeded and finalize() has not run; every kernel entry point that needs NVSHMEM calls it.
void require_initialized(const char* what);
// 1 when this device and the peer GPU (PCI bus id) have native atomics over their link, 0 when not, -1 when the
// peer is not visible to this process.
int p2p_native_atomics(const std::string& peer_bus_id);
std::string pci_bus_id();
bool stream_is_capturing(uintptr_t stream);
// cudaEventRecord, or an external event-record node when the stream is being captured (replays re-record it).
void event_record(uintptr_t event, uintptr_t stream);
// Host-side nvshmem_barrier_all (all PEs; completes outstanding puts and gets first).
void barrier_all();
// Collective symmetric allocation / free; addresses are returned as integers (device pointers).
uintptr_t symmetric_malloc(size_t bytes, size_t alignment);
void symmetric_free(uintptr_t ptr);
// nvshmem_ptr: a local address of `pe`'s copy of the symmetric address, or 0 if pe is not P2P-reachable.
uintptr_t symmetric_peer_ptr(uintptr_t ptr, int pe);

// Registers a VMM allocation (POSIX-FD handle, size a multiple of 512 MiB) as symmetric memory; collective, same
// size on every PE. Returns the address to use with nvshmem_ptr / nvshmem gets.
uintptr_t register_symmetric(uintptr_t va, size_t bytes);
// The size unit of registered buffers: NVSHMEM_CUMEM_GRANULARITY (bytes, or with k/m/g), 512 MiB by default.
size_t register_unit();
void unregister_symmetric(uintptr_t sym, size_t bytes);

}  // namespace dwdp
