// config.cpp — the CPU engine's runtime configuration (cpu_config.h): the one place
// that reads genloss's environment variables, and the settings that
// genloss.native.options() reads and changes. Every setting is an atomic: a kernel
// running on another thread reads either the old or the new value, never a torn one.
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_config.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace genloss {
namespace cpu {
namespace {

struct Config {
  std::atomic<int64_t> stream_min_bytes{kDefaultStreamMinBytes};
  std::atomic<bool> nt_stores{true};
  std::atomic<bool> huge_pages{true};
  std::atomic<int64_t> host_cache_mb{-1};
  std::atomic<int> threads{0};
  std::string isa_forced;
  std::vector<std::string> warnings;
  std::atomic<int64_t> streamed_calls{0};
  std::atomic<bool> forked{false};
  pthread_t fork_thread{};  // in a forked child: the thread that forked (written before any reader)

  Config() {
    // GNU OpenMP is not fork-safe: a child forked after the parent ran a parallel
    // loop inherits, in the thread that forked, the parent's thread pool but none of
    // its threads, and that thread's next team waits for them forever
    // (multiprocessing's 'fork' start method). So in the child that thread runs every
    // loop single-threaded (a team of one touches no pool), as torch does for its own
    // pool, whatever the setting; threads the child starts have no pool yet and build
    // a fresh one, so they use the setting, which also starts at 1 there.
    // Registered once: the config is built once, when the module loads.
    pthread_atfork(nullptr, nullptr, &after_fork_child);
    if (const char* v = value("GENLOSS_STREAM_MIN_BYTES")) {
      int64_t n = 0;
      if (parse_int(v, n))
        stream_min_bytes = n;
      else
        warn("GENLOSS_STREAM_MIN_BYTES", v, "an integer (bytes; < 0: never stream)");
    }
    if (const char* v = value("GENLOSS_HOST_CACHE_MB")) {
      int64_t n = 0;
      if (parse_int(v, n) && n >= 0)
        host_cache_mb = n;
      else
        warn("GENLOSS_HOST_CACHE_MB", v, "an integer >= 0 (MiB; unset: sized by use)");
    }
    if (const char* v = value("GENLOSS_HUGE_PAGES")) {
      if (std::strcmp(v, "0") == 0)
        huge_pages = false;
      else if (std::strcmp(v, "1") != 0)
        warn("GENLOSS_HUGE_PAGES", v, "0 or 1");
    }
    if (const char* v = value("GENLOSS_NUM_THREADS")) {
      int64_t n = 0;
      if (parse_int(v, n) && n >= 1 && n <= 4096)
        threads = static_cast<int>(n);
      else
        warn("GENLOSS_NUM_THREADS", v, "an integer >= 1 (unset: OpenMP's default)");
    }
    if (const char* v = value("GENLOSS_ISA")) {
      if (std::strcmp(v, "sse2") == 0 || std::strcmp(v, "avx2") == 0 || std::strcmp(v, "avx512") == 0)
        isa_forced = v;
      else
        warn("GENLOSS_ISA", v, "sse2, avx2 or avx512");
    }
  }

  static void after_fork_child();

  // An environment variable, null when unset or empty.
  static const char* value(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? v : nullptr;
  }
  static bool parse_int(const char* s, int64_t& out) {
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (end == s || *end != '\0') return false;
    out = v;
    return true;
  }
  void warn(const char* name, const char* v, const char* want) {
    warnings.push_back(std::string(name) + "='" + v + "' is not " + want + "; the default is used");
  }
};

Config& cfg() {
  static Config* c = new Config();  // never destroyed: kernels may run during teardown
  return *c;
}

// Only atomics: the child of a multi-threaded process may call nothing that locks.
void Config::after_fork_child() {
  Config& c = cfg();
  c.threads.store(1, std::memory_order_relaxed);
  c.fork_thread = pthread_self();
  c.forked.store(true, std::memory_order_release);
}

}  // namespace

bool forked_child() {
  return cfg().forked.load(std::memory_order_acquire);
}

const char* isa_forced() {
  return cfg().isa_forced.c_str();
}

int threads_setting() {
  return cfg().threads.load(std::memory_order_relaxed);
}
int threads() {
  const Config& c = cfg();
  if (c.forked.load(std::memory_order_acquire) && pthread_equal(pthread_self(), c.fork_thread)) return 1;
  const int n = threads_setting();
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
void set_threads(int n) {
  cfg().threads.store(n > 0 ? n : 0, std::memory_order_relaxed);
}

int64_t stream_min_bytes() {
  return cfg().stream_min_bytes.load(std::memory_order_relaxed);
}
void set_stream_min_bytes(int64_t n) {
  cfg().stream_min_bytes.store(n, std::memory_order_relaxed);
}

bool nt_stores() {
  return cfg().nt_stores.load(std::memory_order_relaxed);
}
void set_nt_stores(bool on) {
  cfg().nt_stores.store(on, std::memory_order_relaxed);
}

bool huge_pages() {
  return cfg().huge_pages.load(std::memory_order_relaxed);
}
void set_huge_pages(bool on) {
  cfg().huge_pages.store(on, std::memory_order_relaxed);
}

int64_t host_cache_mb() {
  return cfg().host_cache_mb.load(std::memory_order_relaxed);
}
void set_host_cache_mb(int64_t mb) {
  cfg().host_cache_mb.store(mb < 0 ? -1 : mb, std::memory_order_relaxed);
  host_cache_apply_limit();
}

std::vector<std::string> config_warnings() {
  return cfg().warnings;
}

int64_t streamed_calls() {
  return cfg().streamed_calls.load(std::memory_order_relaxed);
}
void count_streamed_call() {
  cfg().streamed_calls.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace genloss
