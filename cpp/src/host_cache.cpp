// host_cache.cpp — large CPU outputs (gradients of 16M-element losses) from a small
// cache of huge-page blocks, handed to torch as DLPack tensors or to NumPy as arrays.
//
// Why: a fresh 64 MiB output is served by glibc with a fresh mmap, and the kernel's
// first write to it costs 16k page faults: on the 2-core VM of bench/README.md
// 25-35 ms, several times the 4-10 ms the fused kernel itself takes. Two fixes:
//  * every block is 2 MiB aligned and advised MADV_HUGEPAGE before first touch
//    (32 faults per 64 MiB instead of 16k; a hint, nothing where THP is "never");
//  * a freed block (torch calls the DLPack deleter when the tensor's storage dies)
//    goes back to a cache, bounded in bytes, and the next output of the same
//    rounded size reuses it with its pages already mapped, as a CUDA caching
//    allocator does. In a training loop the gradients of step k are freed by
//    zero_grad(set_to_none=True) and step k+1 takes the same blocks back.
// Bound on the free blocks kept, by default sized by use: the largest working set of
// recent calls, i.e. the most bytes of cached-size outputs alive at once during the
// current and the previous window of kWindow block requests, or, if more, the blocks that
// recurring sizes need (each size asked for twice or more in those windows, times the most
// of its blocks alive at once: two losses of different sizes, each with its own backward,
// never hold both blocks at once but need both), capped at min(physical memory / 8, 4 GiB).
// A training loop's gradients of step k are all alive together before zero_grad, so step
// k+1 finds every block it needs; a phase that used more (a larger evaluation batch) stops
// pinning memory two windows after it ends; sizes seen once (variable shapes) do not raise
// the bound. Over the bound, the block freed longest ago goes first: a freed block is the
// one the next step most likely asks for again, and blocks of a size no longer asked for (a
// phase that ended, another dtype) must not crowd it out (they did when the largest went
// first and a freed block over the bound was dropped: one miss per call, for good).
// genloss.native.options(host_cache_mb=...) (GENLOSS_HOST_CACHE_MB) sets a
// fixed bound instead (0: no reuse); genloss.native.empty_cache() frees every block.
// Thread-safe: the deleter may run on any thread, without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "cpu_config.h"
#include "dlpack.h"
#include "genloss/common.h"  // DType codes

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace py = pybind11;

namespace genloss {
namespace {

constexpr std::size_t kHuge = std::size_t(2) << 20;

int64_t advise(void* p, std::size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t hi = (a + nbytes) & ~(kHuge - 1);
  if (hi <= lo) return 0;
  if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) != 0) return 0;
  return static_cast<int64_t>(hi - lo);
#else
  (void)p;
  (void)nbytes;
  return 0;
#endif
}

// Block requests per window of the use-sized bound.
constexpr int64_t kWindow = 1024;

// The use-sized bound's cap: an eighth of physical memory, at most 4 GiB.
std::size_t auto_cap() {
  std::size_t cap = std::size_t(4) << 30;
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) cap = std::min(cap, static_cast<std::size_t>(pages) * static_cast<std::size_t>(page) / 8);
#endif
  return cap;
}

// A block of the cache: its address and its (rounded) size.
struct Block {
  void* p;
  std::size_t bytes;
};

struct Cache {
  std::mutex m;
  std::map<uint64_t, Block> by_age;              // the free blocks by when freed (the oldest first)
  std::multimap<std::size_t, uint64_t> by_size;  // rounded size -> its key in by_age
  uint64_t clock = 0;                            // keys of by_age
  std::size_t cached = 0;                        // bytes in by_age
  std::size_t live = 0;                          // bytes handed out and not yet released
  std::size_t peak = 0, peak_prev = 0;           // most bytes live: this window, the last one
  int64_t requests = 0, hits = 0, misses = 0;
  const std::size_t cap = auto_cap();
  // Per block size: blocks live now, most live at once and requests in this window and the last.
  struct Use {
    int64_t live = 0, most = 0, most_prev = 0, asked = 0, asked_prev = 0;
  };
  std::map<std::size_t, Use> use;

  // The bytes that sizes asked for more than once in this window and the last need at once:
  // each such size times the most of its blocks live together. Two losses of different sizes
  // whose outputs are freed one before the other's call (each with its own backward) need
  // both blocks, though no more than one is live at any time (m held).
  std::size_t recurring() const {
    std::size_t n = 0;
    for (const auto& [bytes, u] : use)
      if (u.asked + u.asked_prev >= 2) n += bytes * static_cast<std::size_t>(std::max(u.most, u.most_prev));
    return n;
  }

  // The bound on cached bytes now (m held).
  std::size_t limit() const {
    const int64_t mb = cpu::host_cache_mb();
    if (mb >= 0) return static_cast<std::size_t>(mb) << 20;
    return std::min(std::max({peak, peak_prev, recurring()}), cap);
  }

  // A new window (m held): the older window's counts are forgotten.
  void next_window() {
    peak_prev = peak;
    peak = live;
    for (auto it = use.begin(); it != use.end();) {
      Use& u = it->second;
      u.most_prev = u.most;
      u.most = u.live;
      u.asked_prev = u.asked;
      u.asked = 0;
      it = (u.live == 0 && u.most_prev == 0 && u.asked_prev == 0) ? use.erase(it) : std::next(it);
    }
  }

  // Takes out the free block freed longest ago, into `drop` (m held).
  void drop_oldest(std::vector<void*>& drop) {
    const auto old = by_age.begin();
    const auto same = by_size.equal_range(old->second.bytes);
    for (auto it = same.first; it != same.second; ++it)
      if (it->second == old->first) {
        by_size.erase(it);
        break;
      }
    cached -= old->second.bytes;
    drop.push_back(old->second.p);
    by_age.erase(old);
  }

  // Takes free blocks out until `extra` more bytes fit the bound (m held); the caller
  // frees them after unlocking.
  void trim(std::vector<void*>& drop, std::size_t extra = 0) {
    const std::size_t lim = limit();
    while (cached + extra > lim && !by_age.empty()) drop_oldest(drop);
  }

  void* acquire(std::size_t bytes) {
    std::vector<void*> drop;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(m);
      if (++requests % kWindow == 0) {  // a new window: forget the older counts
        next_window();
        trim(drop);
      }
      live += bytes;
      peak = std::max(peak, live);
      Use& u = use[bytes];
      ++u.asked;
      u.most = std::max(u.most, ++u.live);
      const auto same = by_size.equal_range(bytes);
      if (same.first != same.second) {
        const auto it = std::prev(same.second);  // the one freed last (warmest)
        p = by_age[it->second].p;
        by_age.erase(it->second);
        by_size.erase(it);
        cached -= bytes;
        ++hits;
      } else {
        ++misses;
      }
    }
    for (void* q : drop) std::free(q);
    if (p != nullptr) return p;
    p = std::aligned_alloc(kHuge, bytes);
    if (p == nullptr) {
      std::lock_guard<std::mutex> g(m);
      live -= bytes;
      --use[bytes].live;
      throw std::bad_alloc();
    }
    advise(p, bytes);
    return p;
  }

  void release(void* p, std::size_t bytes) {
    std::vector<void*> drop;
    bool kept = false;
    {
      std::lock_guard<std::mutex> g(m);
      live -= bytes;
      --use[bytes].live;
      if (bytes <= limit()) {
        trim(drop, bytes);
        kept = true;
        by_size.emplace(bytes, clock);
        by_age.emplace(clock++, Block{p, bytes});
        cached += bytes;
      }
    }
    if (!kept) drop.push_back(p);
    for (void* q : drop) std::free(q);
  }

  void apply_limit() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(m);
      trim(drop);
    }
    for (void* q : drop) std::free(q);
  }

  void clear() {
    std::map<uint64_t, Block> blocks;
    {
      std::lock_guard<std::mutex> g(m);
      blocks.swap(by_age);
      by_size.clear();
      cached = 0;
    }
    for (auto& kv : blocks) std::free(kv.second.p);
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may outlive module teardown
  return *c;
}

struct Holder {
  DLManagedTensor managed;
  std::vector<int64_t> shape;
  std::size_t bytes;
};

void deleter(DLManagedTensor* self) {
  auto* h = static_cast<Holder*>(self->manager_ctx);
  cache().release(self->dl_tensor.data, h->bytes);
  delete h;
}

void capsule_destructor(PyObject* cap) {
  // Consumed capsules are renamed "used_dltensor" by the consumer, who owns the deleter.
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (m != nullptr && m->deleter != nullptr) m->deleter(m);
  }
}

// The bytes of the block for `shape` of engine DType `dtype` (its size rounded up to 2 MiB,
// at least one), and the item size; `who` names the caller in errors.
std::size_t block_bytes(const std::vector<int64_t>& shape, int dtype, int last, const char* who, std::size_t* item) {
  if (dtype < kFloat32 || dtype > last)
    throw py::type_error(std::string(who) + ": dtype must be an engine DType code (0-" + std::to_string(last) +
                         "), got " + std::to_string(dtype));
  int64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0) throw py::value_error(std::string(who) + ": negative dimension");
    n *= s;
  }
  *item = dtype == kFloat32 ? 4 : dtype == kFloat64 ? 8 : 2;
  const std::size_t bytes = ((static_cast<std::size_t>(n) * *item + kHuge - 1) / kHuge) * kHuge;
  return bytes == 0 ? kHuge : bytes;
}

}  // namespace

// A C-contiguous CPU float tensor of `shape` (engine DType code: 0 float32, 1 float64,
// 2 float16, 3 bfloat16) as an unconsumed DLPack capsule; its memory comes from the cache.
// (Also used by plan.cpp.)
py::capsule cached_empty(const std::vector<int64_t>& shape, int dtype) {
  std::size_t item = 0;
  const std::size_t bytes = block_bytes(shape, dtype, kBFloat16, "cached_empty", &item);
  auto* h = new Holder();
  h->shape = shape;
  h->bytes = bytes;
  void* p = nullptr;
  try {
    p = cache().acquire(h->bytes);
  } catch (...) {
    delete h;
    throw;
  }
  DLTensor& t = h->managed.dl_tensor;
  t.data = p;
  t.device = {kDLCPU, 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = {static_cast<uint8_t>(dtype == kBFloat16 ? kDLBfloat : kDLFloat), static_cast<uint8_t>(item * 8), 1};
  t.shape = h->shape.data();
  t.strides = nullptr;  // C-contiguous
  t.byte_offset = 0;
  h->managed.manager_ctx = h;
  h->managed.deleter = &deleter;
  PyObject* cap = PyCapsule_New(&h->managed, "dltensor", &capsule_destructor);
  if (cap == nullptr) {
    deleter(&h->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

// The same block as a writeable C-contiguous NumPy array (float32, float64 or float16: NumPy has
// no bfloat16), its base a capsule that gives the block back to the cache when the array dies.
// (np.from_dlpack would do, but marks the array read-only.)
py::array cached_empty_numpy(const std::vector<int64_t>& shape, int dtype) {
  std::size_t item = 0;
  const std::size_t bytes = block_bytes(shape, dtype, kFloat16, "cached_empty_numpy", &item);
  auto* b = new Block{nullptr, bytes};
  try {
    b->p = cache().acquire(bytes);
  } catch (...) {
    delete b;
    throw;
  }
  py::capsule base(b, [](void* q) {
    auto* k = static_cast<Block*>(q);
    cache().release(k->p, k->bytes);
    delete k;
  });
  const char* name = dtype == kFloat32 ? "float32" : dtype == kFloat64 ? "float64" : "float16";
  return py::array(py::dtype(name), shape, b->p, base);
}

namespace {

py::dict cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.m);
  py::dict d;
  d["cached_bytes"] = c.cached;
  d["cached_blocks"] = c.by_age.size();
  d["limit_bytes"] = c.limit();
  d["sized_by_use"] = cpu::host_cache_mb() < 0;
  d["live_bytes"] = c.live;
  d["recent_peak_bytes"] = std::max(c.peak, c.peak_prev);
  d["cap_bytes"] = c.cap;
  d["window_requests"] = kWindow;
  d["hits"] = c.hits;
  d["misses"] = c.misses;
  return d;
}

}  // namespace

void host_cache_apply_limit() {
  cache().apply_limit();
}

}  // namespace genloss

using namespace genloss;

void bind_host_cache(py::module_& m) {
  m.def("cached_empty", &cached_empty, py::arg("shape"), py::arg("dtype"));
  m.def("cached_empty_numpy", &cached_empty_numpy, py::arg("shape"), py::arg("dtype"));
  m.def("host_cache_info", &cache_info);
  m.def("host_cache_clear", [] { cache().clear(); });
}
