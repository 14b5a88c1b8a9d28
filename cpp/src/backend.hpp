// The two graphs of an export, driven through onnxruntime's C++ API with IOBinding, one sequence at a time
// (the contract of docs/manifest.md; runtime/cache.py and runtime/ort.py are the Python reference):
//
//   PortableBackend  the traced graph: a preallocated double-buffered cache, `past` bound from one side and
//                    `present` written straight into the other; with a sliding window W the last W - 1
//                    positions are kept after each step (positions stay absolute)
//   FusedBackend     the fused graph: one buffer per layer bound as both past and present, which
//                    GroupQueryAttention updates in place
//
//   auto backend = Backend::open(manifest);      // files checked against their sha256, the graph against the manifest
//   backend->reset(capacity);                   // a new sequence of up to `capacity` cached positions
//   const float* logits = backend->step(ids, n); // n tokens in; the last one's next-token logits [vocab] out
//
// Sessions (the fused graph): a Cache that outlives one generation, and the ids it holds, so the next turn is fed
// from where its prompt differs (runtime/cache.py's InPlaceCache.admit_prefix is the Python reference):
//
//   auto cache = backend->new_cache(capacity);  // nullptr for the portable graph: each turn starts fresh there
//   backend->use(cache.get());                  // steps run on it (nullptr: the backend's own again)
//   backend->resume(n);                         // keep its first n positions; step() goes on from there
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace mtrt {

// One sequence's KV cache kept between generations: `held` are the ids at its positions 0.. (what step() fed).
class Cache {
 public:
  virtual ~Cache() = default;
  std::vector<int64_t> held;
  int capacity = 0;
  // How many of the held positions a new prompt may start from: all, unless a sliding window has evicted
  // position 0 (the op keeps the last W once the sequence passes the capacity).
  size_t reusable() const { return held.size() <= static_cast<size_t>(capacity) ? held.size() : 0; }
};

class Backend {
 public:
  static std::unique_ptr<Backend> open(const Manifest& m);
  virtual ~Backend() = default;
  virtual void reset(int capacity) = 0;
  virtual const float* step(const int64_t* ids, int n) = 0;
  virtual std::unique_ptr<Cache> new_cache(int capacity) { return nullptr; }
  virtual void use(Cache* cache) {}
  virtual void resume(size_t n) {}
  const Manifest& manifest() const { return m_; }

 protected:
  explicit Backend(const Manifest& m) : m_(m) {}
  Manifest m_;
};

float half_to_float(uint16_t h);

}  // namespace mtrt
