// emulator.cpp — the scheduler and runtime behind emulator.h (read its header comment first).
//
// One launch runs its blocks in order. A block's threads are fibers on the calling OS
// thread (on x86-64 a six-register stack switch: ucontext's switch makes two system calls
// for the signal mask, which made the emulated suite ~10x slower; elsewhere ucontext). The scheduler resumes each
// runnable fiber in thread order; a fiber runs until it returns or waits at a barrier or a warp collective, and a wait
// ends when every live thread it names has arrived (bumping that barrier's generation). A pass in which no fiber can
// run while some are still waiting is a deadlock (threads waiting at different barriers: undefined behaviour on a GPU,
// often a hang) and raises, as does a block whose threads meet at two different __syncthreads() (synccheck's finding).
#include "emulator.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace genloss_emulator {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per thread: the kernels' register arrays live here
constexpr int kMaxThreads = 1024;           // per block, as on every CUDA GPU
constexpr size_t kMaxSharedDynamic = 48 * 1024;

enum Wait { kRunnable, kBlockBarrier, kWarpCollective };

#if defined(__x86_64__)
// genloss_emulator_switch(&save, to): pushes the callee-saved registers (and the SSE/x87 control words),
// stores the stack pointer in save, loads `to` and pops what was pushed there.
extern "C" void genloss_emulator_switch(void** save, void* to);
asm(R"(
  .text
  .globl genloss_emulator_switch
  .hidden genloss_emulator_switch
  .type genloss_emulator_switch, @function
genloss_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size genloss_emulator_switch, .-genloss_emulator_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) {
  genloss_emulator_switch(&from.sp, to.sp);
}
// A fresh fiber's stack: the frame genloss_emulator_switch pops, returning into entry with the
// stack aligned as after a call.
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 16 - 56);
  std::memset(frame, 0, 64);
  const uint32_t mxcsr = 0x1f80, fpucw = 0x037f;  // the defaults: round to nearest, no traps
  std::memcpy(frame, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &fpucw, 4);
  frame[7] = reinterpret_cast<uint64_t>(entry);
  c.sp = frame;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // entry never returns
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  ThreadCtx tc;
  int warp = 0, lane = 0;
  bool done = false;
  Wait wait = kRunnable;
  uint64_t wait_gen = 0;
};

struct Warp {
  unsigned live = 0;     // lanes that have not returned
  unsigned arrived = 0;  // lanes waiting in the current collective
  unsigned mask = 0;     // the current collective's mask
  uint64_t gen = 0;
  uint64_t slot[2][32] = {};  // by generation parity: a fast lane's next collective cannot clobber
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Context sched;
  std::exception_ptr error;  // thrown in a fiber (an emulator check): re-raised by the launch
  int live = 0, arrived = 0;
  uint64_t gen = 0;
  int vote[2] = {0, 0};        // __syncthreads_or's OR, per barrier generation's parity
  const char* site = nullptr;  // the barrier the waiting threads are at
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
};

// Fiber stacks, kept per OS thread across launches (mmap: pages are touched only when used),
// each above a guard page: a kernel that overflows its stack faults instead of writing over
// its neighbour's.
constexpr size_t kGuardBytes = 4096;
struct Stacks {
  std::vector<char*> stacks;
  ~Stacks() {
    for (char* s : stacks) munmap(s - kGuardBytes, kStackBytes + kGuardBytes);
  }
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED || mprotect(p, kGuardBytes, PROT_NONE) != 0)
        throw std::runtime_error("genloss CUDA emulator: no memory for a thread's stack");
      stacks.push_back(static_cast<char*>(p) + kGuardBytes);
    }
    return stacks[i];
  }
};

// AddressSanitizer must be told of every switch between stacks (bench/sanitize.sh runs the
// emulated kernels under it); without it these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
thread_local const void* t_sched_bottom = nullptr;  // the scheduler's stack, learnt at a fiber's entry
thread_local size_t t_sched_size = 0;
inline void asan_start(void** fake, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake, bottom, size);
}
inline void asan_finish(void* fake, bool learn_scheduler) {
  __sanitizer_finish_switch_fiber(fake, learn_scheduler ? &t_sched_bottom : nullptr,
                                  learn_scheduler ? &t_sched_size : nullptr);
}
// A stack reused for a new fiber: the frames the previous one left (it never unwound them)
// are still poisoned.
inline void asan_fresh_stack(char* stack, size_t size) {
  __asan_unpoison_memory_region(stack, size);
}
inline const void* sched_bottom() {
  return t_sched_bottom;
}
inline size_t sched_size() {
  return t_sched_size;
}
#else
inline void asan_start(void**, const void*, size_t) {}
inline void asan_finish(void*, bool) {}
inline void asan_fresh_stack(char*, size_t) {}
inline const void* sched_bottom() {
  return nullptr;
}
inline size_t sched_size() {
  return 0;
}
#endif

thread_local Block* t_block = nullptr;
thread_local Fiber* t_fiber = nullptr;
thread_local cudaError_t t_last = cudaSuccess;
thread_local std::vector<char> t_dynamic;
thread_local Stacks t_stacks;
std::atomic<uint64_t> g_launches{0};

// final: the fiber has returned and is never resumed (its fake stack, under ASan, is dropped).
void yield_to_scheduler(bool final = false) {
  void* fake = nullptr;
  asan_start(final ? nullptr : &fake, sched_bottom(), sched_size());
  switch_context(t_fiber->ctx, t_block->sched);
  asan_finish(fake, true);
}

void release_warp(Warp& w) {
  w.arrived = 0;
  w.mask = 0;
  ++w.gen;
}

// A thread left (returned): the waits that no longer wait for it may end.
void thread_exit(Fiber& f) {
  Block& b = *t_block;
  f.done = true;
  --b.live;
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
  }
  Warp& w = b.warps[f.warp];
  w.live &= ~(1u << f.lane);
  if (w.arrived != 0 && ((w.mask & w.live) & ~w.arrived) == 0) release_warp(w);
}

[[noreturn]] void fiber_entry() {
  asan_finish(nullptr, true);
  Fiber& f = *t_fiber;
  try {
    t_block->body(t_block->body_ctx);
  } catch (...) {  // no exception may unwind past a fiber's first frame
    if (!t_block->error) t_block->error = std::current_exception();
  }
  thread_exit(f);
  yield_to_scheduler(true);  // a finished fiber is never resumed
  std::abort();
}

bool runnable(const Block& b, const Fiber& f) {
  switch (f.wait) {
    case kBlockBarrier:
      return b.gen != f.wait_gen;
    case kWarpCollective:
      return b.warps[f.warp].gen != f.wait_gen;
    default:
      return true;
  }
}

// reverse: resume the fibers from the last thread to the first. Launches alternate the two
// orders, so a kernel that reads what another thread wrote without a barrier (which one
// order can hide: the writer happens to run first) gives a wrong answer in the other.
void run_block(Block& b, int nthreads, bool reverse) {
  for (int i = 0; i < nthreads; ++i) {
    char* stack = t_stacks.get(static_cast<size_t>(i));
    asan_fresh_stack(stack, kStackBytes);
    make_context(b.fibers[i].ctx, stack, kStackBytes, fiber_entry);
  }
  while (b.live > 0) {
    bool progressed = false;
    for (int j = 0; j < nthreads; ++j) {
      const int i = reverse ? nthreads - 1 - j : j;
      Fiber& f = b.fibers[i];
      if (f.done || !runnable(b, f)) continue;
      f.wait = kRunnable;
      t_fiber = &f;
      void* fake = nullptr;
      asan_start(&fake, t_stacks.get(static_cast<size_t>(i)), kStackBytes);
      switch_context(b.sched, f.ctx);
      asan_finish(fake, false);
      t_fiber = nullptr;
      progressed = true;
      if (b.error) std::rethrow_exception(b.error);  // the other fibers are abandoned (no resources)
    }
    if (!progressed)
      throw std::logic_error(
          "genloss CUDA emulator: deadlock (the block's live threads wait at different barriers or warp "
          "collectives)");
  }
}

}  // namespace

const ThreadCtx& current() {
  if (t_fiber == nullptr) throw std::logic_error("genloss CUDA emulator: threadIdx read outside a kernel");
  return t_fiber->tc;
}

void* dynamic_shared() {
  return t_dynamic.data();
}

uint64_t launch_count() {
  return g_launches.load(std::memory_order_relaxed);
}

int lane_id() {
  return t_fiber->lane;
}

void syncthreads(const char* site) {
  Block& b = *t_block;
  Fiber& f = *t_fiber;
  if (b.arrived == 0) {
    b.site = site;
  } else if (std::strcmp(b.site, site) != 0) {
    throw std::logic_error(std::string("genloss CUDA emulator: threads of one block at different __syncthreads() (") +
                           b.site + " and " + site + ")");
  }
  const uint64_t g = b.gen;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f.wait = kBlockBarrier;
  f.wait_gen = g;
  yield_to_scheduler();
}

int syncthreads_or(const char* site, int pred) {
  Block& b = *t_block;
  // The slot of this generation is cleared by its first arrival; it is read by each thread
  // as it leaves this barrier, before any can arrive at the barrier after next (which
  // clears it again): fibers switch only at barriers and collectives.
  int& v = b.vote[b.gen & 1];
  if (b.arrived == 0) v = 0;
  v |= pred != 0;
  syncthreads(site);
  return v;
}

const uint64_t* warp_exchange(unsigned mask, uint64_t mine) {
  Fiber& f = *t_fiber;
  Warp& w = t_block->warps[f.warp];
  const unsigned bit = 1u << f.lane;
  if (!(mask & bit)) throw std::logic_error("genloss CUDA emulator: a warp collective whose mask omits its own lane");
  if (w.arrived != 0 && w.mask != mask)
    throw std::logic_error("genloss CUDA emulator: lanes of one warp in collectives with different masks");
  const uint64_t g = w.gen;
  uint64_t* slots = w.slot[g & 1];
  slots[f.lane] = mine;
  w.mask = mask;
  w.arrived |= bit;
  if (((mask & w.live) & ~w.arrived) == 0) {
    release_warp(w);
  } else {
    f.wait = kWarpCollective;
    f.wait_gen = g;
    yield_to_scheduler();
  }
  return slots;
}

void syncwarp(unsigned mask) {
  warp_exchange(mask, 0);
}

void launch_grid(void (*body)(void*), void* ctx, dim3 grid, dim3 block, size_t shmem) {
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
      nthreads <= 0 || nthreads > kMaxThreads || block.z > 64 || shmem > kMaxSharedDynamic) {
    t_last = cudaErrorInvalidConfiguration;  // as the hardware: the launch does not run
    return;
  }
  if (t_block != nullptr) throw std::logic_error("genloss CUDA emulator: a launch from inside a kernel");
  const bool reverse = (g_launches.fetch_add(1, std::memory_order_relaxed) & 1) != 0;
  t_dynamic.assign(shmem, 0);
  Block b;
  b.fibers.resize(static_cast<size_t>(nthreads));
  b.warps.resize(static_cast<size_t>((nthreads + 31) / 32));
  b.body = body;
  b.body_ctx = ctx;
  t_block = &b;
  struct Reset {
    ~Reset() {
      t_block = nullptr;
      t_fiber = nullptr;
    }
  } reset;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.live = static_cast<int>(nthreads);
        b.arrived = 0;
        for (size_t w = 0; w < b.warps.size(); ++w) {
          const int64_t lanes = std::min<int64_t>(32, nthreads - int64_t(w) * 32);
          b.warps[w] = Warp{};
          b.warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        }
        int64_t i = 0;
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx, ++i) {
              Fiber& f = b.fibers[static_cast<size_t>(i)];
              f = Fiber{};
              f.tc = ThreadCtx{dim3(tx, ty, tz), dim3(bx, by, bz), block, grid};
              f.warp = static_cast<int>(i / 32);
              f.lane = static_cast<int>(i % 32);
            }
        run_block(b, static_cast<int>(nthreads), reverse);
      }
}

// ---- runtime API -------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
  }
  return "unknown error";
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  // 256-byte aligned, as cudaMalloc's blocks are (Scratch relies on it)
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  return cudaMalloc(p, bytes);
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  return cudaFree(p);
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t) {
  std::memset(p, v, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(d, s, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

// ---- 16-bit conversions (IEEE binary16; bfloat16 = float32's top half), round to nearest even

float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24, exact in float
    bits = __builtin_bit_cast(uint32_t, std::ldexp(static_cast<float>(man), -24)) | sign;
  }
  return __builtin_bit_cast(float, bits);
}

__half __float2half_rn(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  __half h;
  if (ax > 0x7f800000u) {
    h.bits = sign | 0x7e00u;  // NaN
  } else if (ax >= 0x47800000u) {
    h.bits = sign | 0x7c00u;      // >= 2^16: infinity (65520 and up round there below too)
  } else if (ax < 0x38800000u) {  // under 2^-14: a subnormal, man = round(|f| 2^24)
    h.bits = sign | static_cast<uint16_t>(std::nearbyint(__builtin_bit_cast(float, ax) * 16777216.0f));
  } else {
    const uint32_t man = ax & 0x7fffffu, rem = man & 0x1fffu;
    uint32_t r = (((ax >> 23) - 112u) << 10) | (man >> 13);
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry may reach infinity: right
    h.bits = sign | static_cast<uint16_t>(r);
  }
  return h;
}

float __bfloat162float(__nv_bfloat16 h) {
  return __builtin_bit_cast(float, uint32_t(h.bits) << 16);
}

__nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  __nv_bfloat16 h;
  if ((x & 0x7fffffffu) > 0x7f800000u)
    h.bits = static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN stays NaN (quiet)
  else
    h.bits = static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  return h;
}

cudaError_t cub::DeviceRadixSort::SortPairs(void* temp, size_t& temp_bytes, const unsigned* keys_in, unsigned* keys_out,
                                            const int* values_in, int* values_out, int n, int begin_bit, int end_bit,
                                            cudaStream_t) {
  if (temp == nullptr) {
    temp_bytes = 1;
    return cudaSuccess;
  }
  const unsigned width = static_cast<unsigned>(end_bit - begin_bit);
  const unsigned mask = width >= 32 ? 0xffffffffu : ((1u << width) - 1u);
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  auto key = [&](int i) { return (keys_in[i] >> begin_bit) & mask; };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) < key(b); });
  std::vector<unsigned> ks(static_cast<size_t>(n));
  std::vector<int> vs(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    ks[static_cast<size_t>(i)] = keys_in[order[static_cast<size_t>(i)]];
    vs[static_cast<size_t>(i)] = values_in[order[static_cast<size_t>(i)]];
  }
  std::copy(ks.begin(), ks.end(), keys_out);
  std::copy(vs.begin(), vs.end(), values_out);
  return cudaSuccess;
}

}  // namespace genloss_emulator
