// Token dispatch / combine kernels (DEP over NVLink). See dwdp/dispatch.h and python/dwdp_ops/dispatch.py.
//
// One call of dispatch_tokens, on the source side then the destination side of every rank:
//   begin      epoch += 1 (a device counter, so CUDA-graph replays advance it too)
//   route      1 block: each token's destinations (the owner rule), its row at each destination (send_pos), counts
//   send       warps over tokens: each token's hidden state once per destination, with its slots' local expert ids
//              and weights, stored through the NVLink mapping; the last block publishes the counts, then the
//              per-source flag = epoch (release, system scope)
//   count      waits for every source's flag (acquire), counts pairs per local expert (slot within the group)
//   scan       group ends (offs), groups starting on multiples of `align`
//   permute    copies each pair's row into x_grouped, records its position (pair_pos)
// combine_tokens: combine_send (per received row: the weighted sum of its pairs' expert outputs in ascending slot
// order, float32, stored into the source's comb buffer; the last block raises the combine flags), then combine_recv
// (waits for every destination, sums the partials in ascending destination order, rounds once to bf16).
//
// Buffer reuse needs no extra synchronisation: a source writes a destination's receive buffers for step i+1 only
// after its combine of step i saw that destination's combine flag, which the destination raised after it finished
// reading them (permute precedes the expert GEMM precedes combine_send in its stream). The same argument covers comb.
// Every wait has a cycle budget; when it runs out the kernel prints the rank and the peer it waited for and traps.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>

#include "dwdp/check.h"
#include "dwdp/dispatch.h"
#include "dwdp/runtime.h"

namespace dwdp {
namespace {

struct State {
  unsigned long long epoch;
  unsigned int send_blocks, comb_blocks;
  int err, err_value;
};

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ void wait_flag(const unsigned long long* flag, unsigned long long want, int rank, int peer,
                          long long budget, const char* what) {
  const long long t0 = clock64();
  while (ld_acquire_sys(flag) < want) {
    if (clock64() - t0 > budget) {
      printf("dwdp_ops %s: rank %d waited %lld cycles for rank %d (step %llu) and gives up (trap)\n", what, rank,
             budget, peer, want);
      __trap();
    }
  }
}

__device__ __forceinline__ int load_id(const void* ids, int ids_int64, long long i) {
  return ids_int64 ? static_cast<int>(reinterpret_cast<const long long*>(ids)[i]) : reinterpret_cast<const int*>(ids)[i];
}

// The owner rule of dispatch_plan: this rank if it owns e, else owners[(t + e) % len(owners)] (ascending owners).
__device__ __forceinline__ int dest_of(const DispatchArgs& a, int t, int e) {
  const int L = a.experts_per_rank, s = a.stride;
  const int lo = max(0, (e - L + s) / s);  // smallest r with r*s + L > e
  const int hi = min(a.world - 1, e / s);  // largest r with r*s <= e
  if (a.rank >= lo && a.rank <= hi) return a.rank;
  return lo + (t + e) % (hi - lo + 1);
}

// err: 1 = an expert id outside [-1, E) (value: the id), 2 = more grouped rows than max_pairs (value: rows needed)
__device__ __forceinline__ void flag_error(State* st, int code, int value) {
  if (atomicCAS(&st->err, 0, code) == 0) st->err_value = value;
}

// Received row g (over all sources, in source order) -> (source, row within the source).
__device__ __forceinline__ int locate(const int* counts, int world, int g, int* r) {
  int s = 0;
  while (s < world - 1 && g >= counts[s]) g -= counts[s++];
  *r = g;
  return s;
}

__device__ __forceinline__ int total_rows(const int* counts, int world) {
  int n = 0;
  for (int s = 0; s < world; ++s) n += counts[s];
  return n;
}

__global__ void begin_kernel(State* st) { st->epoch += 1; }

__global__ void route_kernel(DispatchArgs a, const void* ids, int T, State* st) {
  __shared__ int warp_tot[32][kDispatchMaxRanks];
  __shared__ int base[kDispatchMaxRanks];
  int* send_pos = reinterpret_cast<int*>(a.send_pos);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (threadIdx.x < a.world) base[threadIdx.x] = 0;
  __syncthreads();
  for (int t0 = 0; t0 < T; t0 += blockDim.x) {
    const int t = t0 + threadIdx.x;
    unsigned mask = 0;
    if (t < T) {
      for (int j = 0; j < a.top_k; ++j) {
        const int e = load_id(ids, a.ids_int64, static_cast<long long>(t) * a.top_k + j);
        if (e >= 0 && e < a.num_experts) mask |= 1u << dest_of(a, t, e);
        else if (e != -1) flag_error(st, 1, e);
      }
    }
    unsigned ballots[kDispatchMaxRanks];
    for (int d = 0; d < a.world; ++d) {
      ballots[d] = __ballot_sync(0xffffffffu, (mask >> d) & 1u);
      if (lane == 0) warp_tot[warp][d] = __popc(ballots[d]);
    }
    __syncthreads();
    if (t < T) {
      for (int d = 0; d < a.world; ++d) {
        int pre = base[d];
        for (int w = 0; w < warp; ++w) pre += warp_tot[w][d];
        pre += __popc(ballots[d] & ((1u << lane) - 1u));
        send_pos[static_cast<long long>(t) * a.world + d] = ((mask >> d) & 1u) ? pre : -1;
      }
    }
    __syncthreads();
    if (threadIdx.x < a.world) {
      int add = 0;
      for (int w = 0; w < nwarps; ++w) add += warp_tot[w][threadIdx.x];
      base[threadIdx.x] += add;
    }
    __syncthreads();
  }
  if (threadIdx.x < a.world) reinterpret_cast<int*>(a.send_count)[threadIdx.x] = base[threadIdx.x];
}

__device__ __forceinline__ void warp_copy16(uint4* __restrict__ dst, const uint4* __restrict__ src, int n16, int lane) {
  int i = lane;
  for (; i + 96 < n16; i += 128) {
    const uint4 v0 = src[i], v1 = src[i + 32], v2 = src[i + 64], v3 = src[i + 96];
    dst[i] = v0;
    dst[i + 32] = v1;
    dst[i + 64] = v2;
    dst[i + 96] = v3;
  }
  for (; i < n16; i += 32) dst[i] = src[i];
}

// The last block to finish raises `flag_slot` (0 dispatch, 1 combine) at every peer; counts first when dispatching.
__device__ void publish(const DispatchArgs& a, State* st, unsigned int* blocks, int flag_slot) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(blocks, 1u);
    if (prev == gridDim.x - 1) {
      __threadfence_system();
      if (flag_slot == 0)
        for (int d = 0; d < a.world; ++d)
          reinterpret_cast<int*>(a.recv_count[d])[a.rank] = reinterpret_cast<const int*>(a.send_count)[d];
      __threadfence_system();
      const unsigned long long ep = st->epoch;
      for (int d = 0; d < a.world; ++d)
        st_release_sys(reinterpret_cast<unsigned long long*>(a.flags[d]) + flag_slot * a.world + a.rank, ep);
      *blocks = 0;
    }
  }
}

__global__ void send_kernel(DispatchArgs a, const uint4* __restrict__ x, const void* ids, const float* __restrict__ w,
                            int T, State* st) {
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nw = (gridDim.x * blockDim.x) >> 5;
  const int n16 = a.hidden * 2 / 16, k = a.top_k;
  const int* send_pos = reinterpret_cast<const int*>(a.send_pos);
  for (int t = gw; t < T; t += nw) {
    int e = -1, dj = -1;
    float wj = 0.f;
    if (lane < k) {
      e = load_id(ids, a.ids_int64, static_cast<long long>(t) * k + lane);
      wj = w[static_cast<long long>(t) * k + lane];
      if (e >= 0 && e < a.num_experts) dj = dest_of(a, t, e);
    }
    for (int d = 0; d < a.world; ++d) {
      const int pos = send_pos[static_cast<long long>(t) * a.world + d];
      if (pos < 0) continue;
      const long long row = static_cast<long long>(a.rank) * a.max_tokens + pos;
      warp_copy16(reinterpret_cast<uint4*>(a.recv_x[d]) + row * n16, x + static_cast<long long>(t) * n16, n16, lane);
      if (lane < k) {
        reinterpret_cast<int*>(a.recv_meta[d])[row * k + lane] = dj == d ? e - d * a.stride : -1;
        reinterpret_cast<float*>(a.recv_w[d])[row * k + lane] = wj;
      }
    }
  }
  publish(a, st, &st->send_blocks, 0);
}

__device__ __forceinline__ void wait_all(const DispatchArgs& a, State* st, int flag_slot, const char* what) {
  if (threadIdx.x < a.world)
    wait_flag(reinterpret_cast<const unsigned long long*>(a.flags[a.rank]) + flag_slot * a.world + threadIdx.x,
              st->epoch, a.rank, threadIdx.x, a.spin_budget, what);
  __syncthreads();
}

__global__ void count_kernel(DispatchArgs a, State* st) {
  wait_all(a, st, 0, "dispatch");
  const int k = a.top_k;
  const int* counts = reinterpret_cast<const int*>(a.recv_count[a.rank]);
  const int* meta = reinterpret_cast<const int*>(a.recv_meta[a.rank]);
  int* pair_pos = reinterpret_cast<int*>(a.pair_pos);
  int* ecount = reinterpret_cast<int*>(a.expert_count);
  const long long tid = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long nth = static_cast<long long>(gridDim.x) * blockDim.x;
  for (int s = 0; s < a.world; ++s) {
    const long long base = static_cast<long long>(s) * a.max_tokens * k;
    const long long n = static_cast<long long>(counts[s]) * k;
    for (long long i = tid; i < n; i += nth) {
      const int le = meta[base + i];
      pair_pos[base + i] = le >= 0 ? atomicAdd(&ecount[le], 1) : -1;
    }
  }
}

__global__ void scan_kernel(DispatchArgs a, State* st) {
  if (threadIdx.x != 0) return;
  const int* ecount = reinterpret_cast<const int*>(a.expert_count);
  int* offs = reinterpret_cast<int*>(a.offs);
  long long end = 0;
  for (int le = 0; le < a.experts_per_rank; ++le) {
    end += (static_cast<long long>(ecount[le]) + a.align - 1) / a.align * a.align;
    offs[le] = static_cast<int>(min(end, static_cast<long long>(a.max_pairs)));
  }
  if (end > a.max_pairs) flag_error(st, 2, static_cast<int>(min(end, 2147483647LL)));
}

__global__ void permute_kernel(DispatchArgs a, State* st) {
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nw = (gridDim.x * blockDim.x) >> 5;
  const int n16 = a.hidden * 2 / 16, k = a.top_k;
  const int* counts = reinterpret_cast<const int*>(a.recv_count[a.rank]);
  const int* meta = reinterpret_cast<const int*>(a.recv_meta[a.rank]);
  const int* offs = reinterpret_cast<const int*>(a.offs);
  int* pair_pos = reinterpret_cast<int*>(a.pair_pos);
  const uint4* rx = reinterpret_cast<const uint4*>(a.recv_x[a.rank]);
  uint4* xg = reinterpret_cast<uint4*>(a.x_grouped);
  const int total = total_rows(counts, a.world);
  for (int g = gw; g < total; g += nw) {
    {
      int r;
      const int s = locate(counts, a.world, g, &r);
      const long long row = static_cast<long long>(s) * a.max_tokens + r;
      for (int j = 0; j < k; ++j) {
        const int le = meta[row * k + j];
        if (le < 0) continue;
        const int start = le ? offs[le - 1] : 0;
        const int slot = pair_pos[row * k + j];
        const long long dst = static_cast<long long>(start) + slot;
        const bool fits = dst < a.max_pairs;
        __syncwarp();
        if (lane == 0) pair_pos[row * k + j] = fits ? static_cast<int>(dst) : -1;
        if (fits) warp_copy16(xg + dst * n16, rx + row * n16, n16, lane);
      }
    }
  }
}

__global__ void combine_send_kernel(DispatchArgs a, const uint4* __restrict__ y, State* st) {
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nw = (gridDim.x * blockDim.x) >> 5;
  const int n16 = a.hidden * 2 / 16, k = a.top_k;
  const int* counts = reinterpret_cast<const int*>(a.recv_count[a.rank]);
  const int* pair_pos = reinterpret_cast<const int*>(a.pair_pos);
  const float* rw = reinterpret_cast<const float*>(a.recv_w[a.rank]);
  const int total = total_rows(counts, a.world);
  for (int g = gw; g < total; g += nw) {
    {
      int r;
      const int s = locate(counts, a.world, g, &r);
      const long long row = static_cast<long long>(s) * a.max_tokens + r;
      float4* dst = reinterpret_cast<float4*>(a.comb[s]) +
                    (static_cast<long long>(a.rank) * a.max_tokens + r) * (n16 * 2);
      for (int v = lane; v < n16; v += 32) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < k; ++j) {
          const int p = pair_pos[row * k + j];
          if (p < 0) continue;
          const float wj = rw[row * k + j];
          const uint4 q = y[static_cast<long long>(p) * n16 + v];
          const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const float2 f = __bfloat1622float2(h[u]);
            acc[2 * u] = __fadd_rn(acc[2 * u], __fmul_rn(wj, f.x));  // no FMA contraction: the reference's rounding
            acc[2 * u + 1] = __fadd_rn(acc[2 * u + 1], __fmul_rn(wj, f.y));
          }
        }
        dst[2 * v] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        dst[2 * v + 1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      }
    }
  }
  publish(a, st, &st->comb_blocks, 1);
}

__global__ void combine_recv_kernel(DispatchArgs a, __nv_bfloat16* __restrict__ out, int T, State* st) {
  wait_all(a, st, 1, "combine");
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nw = (gridDim.x * blockDim.x) >> 5;
  const int H = a.hidden;
  const int* send_pos = reinterpret_cast<const int*>(a.send_pos);
  const float* comb = reinterpret_cast<const float*>(a.comb[a.rank]);
  for (int t = gw; t < T; t += nw) {
    for (int h = lane * 4; h < H; h += 128) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int d = 0; d < a.world; ++d) {
        const int pos = send_pos[static_cast<long long>(t) * a.world + d];
        if (pos < 0) continue;
        const float4 v = *reinterpret_cast<const float4*>(comb + (static_cast<long long>(d) * a.max_tokens + pos) * H + h);
        acc[0] = __fadd_rn(acc[0], v.x);
        acc[1] = __fadd_rn(acc[1], v.y);
        acc[2] = __fadd_rn(acc[2], v.z);
        acc[3] = __fadd_rn(acc[3], v.w);
      }
      __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out + static_cast<long long>(t) * H + h);
      o[0] = __floats2bfloat162_rn(acc[0], acc[1]);
      o[1] = __floats2bfloat162_rn(acc[2], acc[3]);
    }
  }
}

void check_args(const DispatchArgs& a, int T) {
  require_initialized("dispatch");
  DWDP_REQUIRE(a.world >= 1 && a.world <= kDispatchMaxRanks, "dispatch: 1 to " << kDispatchMaxRanks << " ranks");
  DWDP_REQUIRE(a.top_k >= 1 && a.top_k <= kDispatchMaxTopK, "dispatch: top_k must be in [1, " << kDispatchMaxTopK << "]");
  DWDP_REQUIRE(a.hidden > 0 && a.hidden % 8 == 0, "dispatch: hidden must be a positive multiple of 8, got " << a.hidden);
  DWDP_REQUIRE(T >= 0 && T <= a.max_tokens, "dispatch: " << T << " tokens exceed the capacity of " << a.max_tokens);
  DWDP_REQUIRE(a.num_blocks >= 1 && a.threads >= 64 && a.threads <= 1024 && a.threads % 32 == 0,
               "dispatch: bad launch shape " << a.num_blocks << " x " << a.threads);
  DWDP_REQUIRE(a.align >= 1 && a.experts_per_rank >= 1 && a.stride >= 1, "dispatch: bad geometry");
}

}  // namespace

void dispatch_tokens(const DispatchArgs& a, uintptr_t x, uintptr_t topk_ids, uintptr_t topk_weights, int T,
                     uintptr_t stream) {
  check_args(a, T);
  DeviceGuard guard(device());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* st = reinterpret_cast<State*>(a.epoch);
  DWDP_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(a.expert_count), 0, sizeof(int) * a.experts_per_rank, s));
  begin_kernel<<<1, 1, 0, s>>>(st);
  route_kernel<<<1, 1024, 0, s>>>(a, reinterpret_cast<const void*>(topk_ids), T, st);
  send_kernel<<<a.num_blocks, a.threads, 0, s>>>(a, reinterpret_cast<const uint4*>(x),
                                                 reinterpret_cast<const void*>(topk_ids),
                                                 reinterpret_cast<const float*>(topk_weights), T, st);
  count_kernel<<<a.num_blocks, a.threads, 0, s>>>(a, st);
  scan_kernel<<<1, 32, 0, s>>>(a, st);
  permute_kernel<<<a.num_blocks, a.threads, 0, s>>>(a, st);
  DWDP_LAUNCH_CHECK();
}

void combine_tokens(const DispatchArgs& a, uintptr_t y_grouped, uintptr_t out, int T, uintptr_t stream) {
  check_args(a, T);
  DeviceGuard guard(device());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* st = reinterpret_cast<State*>(a.epoch);
  combine_send_kernel<<<a.num_blocks, a.threads, 0, s>>>(a, reinterpret_cast<const uint4*>(y_grouped), st);
  combine_recv_kernel<<<a.num_blocks, a.threads, 0, s>>>(a, reinterpret_cast<__nv_bfloat16*>(out), T, st);
  DWDP_LAUNCH_CHECK();
}

}  // namespace dwdp
