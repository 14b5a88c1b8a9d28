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
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace mtrt {

class Backend {
 public:
  static std::unique_ptr<Backend> open(const Manifest& m);
  virtual ~Backend() = default;
  virtual void reset(int capacity) = 0;
  virtual const float* step(const int64_t* ids, int n) = 0;
  const Manifest& manifest() const { return m_; }

 protected:
  explicit Backend(const Manifest& m) : m_(m) {}
  Manifest m_;
};

float half_to_float(uint16_t h);

}  // namespace mtrt
