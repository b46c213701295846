// address.h — the bindings receive raw addresses from Python (integers: DLPack data
// pointers the Python side has already checked); one cast turns them back into pointers.
#pragma once

#include <cstdint>

template <class T = void>
inline T* P(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
