// cpu_config.h — the CPU engine's tuning constants and its runtime configuration.
// CPU only: genloss/engine.h is the interface shared with the CUDA engine and keeps
// none of this.
//
// The runtime settings (Python: genloss.native.options) live in config.cpp, the ONE
// place that reads their environment variables, once, when the module loads:
//   GENLOSS_HUGE_PAGES        huge_pages       0: plain allocations (no cache, no advice)
//   GENLOSS_HOST_CACHE_MB     host_cache_mb    free blocks the output cache keeps
//                                              (unset: sized by use, host_cache.cpp)
//   GENLOSS_STREAM_MIN_BYTES  stream_min_bytes streaming-store threshold (< 0: never)
//   GENLOSS_NUM_THREADS       threads          OpenMP threads of the engine's parallel
//                                              loops (unset: OpenMP's default)
//   GENLOSS_ISA               (read only)      sse2 | avx2 | avx512: a narrower build
// A value that does not parse leaves the default and is reported by config_warnings()
// (Python warns, naming the variable).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace genloss {
namespace cpu {

// ---- tuning ------------------------------------------------------------------
// Below this many elements a call runs on one thread: forking costs more.
constexpr int64_t kParallelMin = 1 << 15;
// Independent accumulators per map_reduce chunk; the same on every ISA build, so the
// builds sum in the same order.
constexpr int kLanes = 16;
// Alignment a block needs for non-temporal (streaming) stores: one cache line.
constexpr uintptr_t kStreamAlign = 64;
// map_reduce prefetches its inputs this far ahead (cpu_kernels.cpp).
constexpr int64_t kPrefetchBytes = 4096;
// Points per chunk of the Gaussian-mixture parameter sums.
constexpr int64_t kGmmChunk = 1024;
// Default streaming-store threshold: outputs this large do not fit in a core's L2.
constexpr int64_t kDefaultStreamMinBytes = int64_t{2} << 20;
// Outputs of at least this many bytes come from the output cache (host_cache.cpp).
constexpr int64_t kHostCacheMinBytes = int64_t{4} << 20;

// ---- runtime configuration (config.cpp) --------------------------------------
const char* isa();         // the instruction-set build running (cpu_dispatch.cpp)
const char* isa_forced();  // what GENLOSS_ISA asked for, "" if unset
// OpenMP threads of the engine's parallel loops: the setting (0 = OpenMP's default,
// OMP_NUM_THREADS or the cores) and the count a loop started now uses.
int threads_setting();
int threads();
void set_threads(int n);  // n >= 0
// True in a process forked from one that loaded the engine: there the setting starts
// at 1 (config.cpp, after_fork_child), because GNU OpenMP's pool does not survive fork.
bool forked_child();
// map_reduce writes its gradients and elementwise values through block buffers, with
// non-temporal (streaming) stores where 64-byte aligned, when the call writes at
// least this many bytes in all (< 0: never; smaller calls store in place). Such outputs do not fit in one core's L2
// anyway: streaming skips the read-for-ownership of every destination line (a quarter of a 3-in/1-out loss's DRAM
// traffic) and leaves the caches to the caller's code. Only the stores differ: the results are the same bits
// (cpu_kernels.cpp, chunk).
int64_t stream_min_bytes();
void set_stream_min_bytes(int64_t n);
// Above the threshold, streaming stores where aligned (true, the default) or plain
// stores in the same loop (false): what lets a test compare the two.
bool nt_stores();
void set_nt_stores(bool on);
// Large CPU outputs from the huge-page block cache (host_cache.cpp) and huge-page
// advice for NumPy outputs; false: plain allocations.
bool huge_pages();
void set_huge_pages(bool on);
// The output cache's bound on free blocks, in MiB: < 0 = sized by use (the default).
int64_t host_cache_mb();
void set_host_cache_mb(int64_t mb);  // applies it to the cache at once
std::vector<std::string> config_warnings();

// ---- counters (read by tests) ------------------------------------------------
int64_t streamed_calls();  // map_reduce calls that streamed some output
void count_streamed_call();

}  // namespace cpu

void host_cache_apply_limit();  // host_cache.cpp: re-reads host_cache_mb, trims the cache

}  // namespace genloss
