#include "backend.hpp"

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

namespace mtrt {

float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) mant <<= 1, --exp;
      bits = sign | exp << 23 | (mant & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

Ort::Env& env() {  // one per process, before and after every session
  static Ort::Env e(ORT_LOGGING_LEVEL_ERROR, "mistral-trt");
  return e;
}

std::string first_line(const std::string& s, size_t limit = 300) {
  std::string line = s.substr(0, s.find('\n'));
  return line.substr(0, limit);
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    default: return "tensor(other)";
  }
}

// The graph onnxruntime loaded must have the manifest's inputs and outputs (names, dtypes, ranks, fixed sizes),
// as runtime/ort.py's check_session_io says it.
void check_session_io(Ort::Session& s, const Manifest& m, const std::string& path) {
  Ort::AllocatorWithDefaultOptions alloc;
  struct Graph {
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<std::string> symbolic;
  };
  for (int k = 0; k < 2; ++k) {
    bool inputs = k == 0;
    std::string kind = inputs ? "input" : "output";
    std::map<std::string, Graph> have;
    size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
    for (size_t i = 0; i < n; ++i) {
      std::string name = (inputs ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc)).get();
      Ort::TypeInfo type = inputs ? s.GetInputTypeInfo(i) : s.GetOutputTypeInfo(i);  // owns what info views
      auto info = type.GetTensorTypeAndShapeInfo();
      Graph g{type_name(info.GetElementType()), info.GetShape(), {}};
      std::vector<const char*> sym(g.shape.size());
      info.GetSymbolicDimensions(sym.data(), sym.size());
      for (auto* c : sym) g.symbolic.push_back(c ? c : "");
      have[name] = g;
    }
    for (const auto& spec : inputs ? m.inputs : m.outputs) {
      auto it = have.find(spec.name);
      if (it == have.end())
        throw Error(path + ": the graph has no " + kind + " '" + spec.name +
                    "' that manifest.json lists; not the graph this manifest describes");
      const Graph& g = it->second;
      bool ok = g.dtype == spec.dtype && g.shape.size() == spec.dims.size();
      for (size_t d = 0; ok && d < g.shape.size(); ++d)
        if (spec.dims[d].is_number_integer() && spec.dims[d].get<int64_t>() != g.shape[d]) ok = false;
      if (!ok) {
        std::string shape = "[", want = "[";
        for (size_t d = 0; d < g.shape.size(); ++d)
          shape += (d ? ", " : "") + (g.shape[d] >= 0 ? std::to_string(g.shape[d])
                                      : g.symbolic[d].empty() ? std::string("None") : "'" + g.symbolic[d] + "'");
        for (size_t d = 0; d < spec.dims.size(); ++d) want += (d ? ", " : "") + py_repr(spec.dims[d]);
        throw Error(path + ": " + kind + " '" + spec.name + "' is " + g.dtype + " " + shape + "] in the graph, manifest.json says " +
                    spec.dtype + " " + want + "]; not the graph this manifest describes");
      }
      have.erase(it);
    }
    if (!have.empty()) {
      std::string extra;
      int shown = 0;
      for (const auto& [name, _] : have)
        if (shown++ < 3) extra += (extra.empty() ? "" : ", ") + name;
      throw Error(path + ": the graph has " + kind + "s manifest.json does not list (" + extra +
                  "); not the graph this manifest describes");
    }
  }
}

// What both backends share: the checked session, the names they bind, typed buffers, logits as float32.
class OrtBackend : public Backend {
 protected:
  explicit OrtBackend(const Manifest& m)
      : Backend(m), mem_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    path_ = join_path(m.folder, "model.onnx");
    if (!is_file(path_)) throw Error(path_ + ": missing (the export folder is incomplete)");
    m.check_files();  // weights changed after export would run and print garbage
    Ort::SessionOptions opts;
    opts.SetLogSeverityLevel(3);
    if (m.precision == "int8-w8a8")  // a TensorRT artifact: unfused Q/DQ computes TensorRT's exact int8 GEMM on any CPU
      opts.AddConfigEntry("session.disable_quant_qdq", "1");
    try {
      session_ = std::make_unique<Ort::Session>(env(), path_.c_str(), opts);
    } catch (const Ort::Exception& e) {
      throw Error(path_ + ": onnxruntime cannot load it: " + first_line(e.what()));
    }
    check_session_io(*session_, m, path_);
    elem_ = m.dtype == "fp16" ? 2 : 4;
    kv_type_ = m.dtype == "fp16" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    for (const auto& t : m.inputs)
      if (t.name.rfind("past_key_values.", 0) == 0) past_names_.push_back(t.name);
    for (size_t i = 1; i < m.outputs.size(); ++i) present_names_.push_back(m.outputs[i].name);
  }

  template <typename T>
  Ort::Value tensor(T* data, std::vector<int64_t> shape) {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    return Ort::Value::CreateTensor<T>(mem_, data, n, shape.data(), shape.size());
  }
  Ort::Value kv_tensor(void* data, std::vector<int64_t> shape) {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    static char empty[16];  // a zero-size past still needs an address
    return Ort::Value::CreateTensor(mem_, n ? data : empty, n * elem_, shape.data(), shape.size(), kv_type_);
  }

  void run(Ort::IoBinding& io) {
    try {
      session_->Run(Ort::RunOptions{nullptr}, io);
    } catch (const Ort::Exception& e) {
      std::string msg = e.what();
      auto p = msg.find("Status Message:");
      if (p != std::string::npos) msg = msg.substr(p + 15);
      msg.erase(0, msg.find_first_not_of(' '));
      throw Error(path_ + ": onnxruntime failed running the graph (" + first_line(msg) +
                  "); its inputs and outputs matched the manifest when loaded, so onnxruntime refused "
                  "this step or the graph was edited after export");
    }
  }

  // logits row `row` of a [rows, vocab] buffer as float32
  const float* as_float(const std::vector<uint8_t>& buf, size_t row) {
    size_t v = m_.model.vocab_size;
    logits_.resize(v);
    if (elem_ == 4) {
      std::memcpy(logits_.data(), buf.data() + row * v * 4, v * 4);
    } else {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(buf.data()) + row * v;
      for (size_t i = 0; i < v; ++i) logits_[i] = half_to_float(h[i]);
    }
    return logits_.data();
  }

  std::string path_;
  Ort::MemoryInfo mem_;
  std::unique_ptr<Ort::Session> session_;
  size_t elem_ = 4;
  ONNXTensorElementDataType kv_type_;
  std::vector<std::string> past_names_, present_names_;
  std::vector<uint8_t> logits_raw_;
  std::vector<float> logits_;
};

class PortableBackend final : public OrtBackend {
 public:
  explicit PortableBackend(const Manifest& m) : OrtBackend(m) {}

  void reset(int capacity) override {
    const auto& a = m_.model;
    size_t need = static_cast<size_t>(a.num_kv_heads) * capacity * a.head_dim * elem_;
    for (auto& side : sides_) {
      side.resize(past_names_.size());
      for (auto& buf : side)
        if (buf.size() < need) buf.assign(need, 0);
    }
    capacity_ = capacity, side_ = 0, length_ = 0, next_pos_ = 0;
  }

  const float* step(const int64_t* ids, int n) override {
    const auto& a = m_.model;
    if (length_ + n > capacity_)
      throw Error("KV cache overflow: " + std::to_string(length_) + " + " + std::to_string(n) + " positions > capacity " +
                  std::to_string(capacity_));
    int total = length_ + n;
    ids_.assign(ids, ids + n);
    mask_.assign(total, 1);  // one sequence: every held column is a real token
    pos_.resize(n);
    for (int i = 0; i < n; ++i) pos_[i] = next_pos_ + i;  // absolute: never reset by the window's trim
    logits_raw_.resize(static_cast<size_t>(n) * a.vocab_size * elem_);
    Ort::IoBinding io(*session_);
    io.BindInput("input_ids", tensor(ids_.data(), {1, n}));
    io.BindInput("attention_mask", tensor(mask_.data(), {1, total}));
    io.BindInput("position_ids", tensor(pos_.data(), {1, n}));
    for (size_t t = 0; t < past_names_.size(); ++t) {
      io.BindInput(past_names_[t].c_str(), kv_tensor(sides_[side_][t].data(), {1, a.num_kv_heads, length_, a.head_dim}));
      io.BindOutput(present_names_[t].c_str(),
                    kv_tensor(sides_[1 - side_][t].data(), {1, a.num_kv_heads, total, a.head_dim}));
    }
    io.BindOutput("logits", kv_tensor(logits_raw_.data(), {1, n, a.vocab_size}));
    run(io);
    commit(n);
    return as_float(logits_raw_, n - 1);
  }

 private:
  // present becomes the past; with a window, its last `keep` columns are copied back (the trim)
  void commit(int n) {
    const auto& a = m_.model;
    int total = length_ + n;
    next_pos_ += n;
    if (m_.keep && total > *m_.keep) {
      int keep = *m_.keep;
      size_t row = static_cast<size_t>(a.head_dim) * elem_;
      for (size_t t = 0; t < past_names_.size(); ++t)
        for (int h = 0; h < a.num_kv_heads; ++h)
          std::memcpy(sides_[side_][t].data() + h * keep * row,
                      sides_[1 - side_][t].data() + (static_cast<size_t>(h) * total + total - keep) * row, keep * row);
      length_ = keep;
    } else {
      side_ = 1 - side_, length_ = total;
    }
  }

  std::vector<std::vector<uint8_t>> sides_[2];  // [side][tensor]: [1, KV, capacity, D] each
  int capacity_ = 0, side_ = 0, length_ = 0;
  int64_t next_pos_ = 0;
  std::vector<int64_t> ids_, mask_, pos_;
};

// The fused graph's cache: one buffer per layer tensor, [1, KV, capacity, D], bound as both past and present.
// calloc: the pages are untouched (not resident) until the op writes them, so a session sized for the whole
// context costs memory only as it fills.
struct FusedCache final : Cache {
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<uint8_t, Free>> buffers;
  std::unique_ptr<Ort::IoBinding> io;  // the buffers are bound once: only the small inputs change per step
};

class FusedBackend final : public OrtBackend {
 public:
  explicit FusedBackend(const Manifest& m) : OrtBackend(m) {}

  void reset(int capacity) override {
    int cap = std::max(capacity, m_.model.sliding_window.value_or(0));  // the op keeps W positions
    if (cur_ == &own_ && cap != own_.capacity) allocate(own_, cap);
    cur_->held.clear();  // the op writes from position 0 again; what was there is never read
  }

  std::unique_ptr<Cache> new_cache(int capacity) override {
    auto c = std::make_unique<FusedCache>();
    allocate(*c, std::max(capacity, m_.model.sliding_window.value_or(0)));
    return c;
  }

  void use(Cache* cache) override { cur_ = cache ? static_cast<FusedCache*>(cache) : &own_; }

  void resume(size_t n) override {
    if (n > cur_->reusable()) throw Error("resume at " + std::to_string(n) + ": the cache holds " +
                                          std::to_string(cur_->reusable()) + " reusable positions");
    cur_->held.resize(n);
  }

  const float* step(const int64_t* ids, int n) override {
    const auto& a = m_.model;
    FusedCache& c = *cur_;
    if (!c.io) throw Error("step before reset: the cache has no buffers");
    int64_t total = static_cast<int64_t>(c.held.size()) + n;
    if (!m_.model.sliding_window && total > c.capacity)
      throw Error("KV cache overflow: " + std::to_string(total) + " positions > capacity " + std::to_string(c.capacity));
    ids_.assign(ids, ids + n);
    seqlens_k_ = static_cast<int32_t>(total - 1), total_len_ = static_cast<int32_t>(total), query_ = n;
    index_ = n - 1;  // logits of the last token only
    logits_raw_.resize(static_cast<size_t>(a.vocab_size) * elem_);
    c.io->BindInput("input_ids", tensor(ids_.data(), {1, n}));
    c.io->BindInput("seqlens_k", tensor(&seqlens_k_, {1}));
    c.io->BindInput("total_sequence_length", tensor(&total_len_, {}));
    c.io->BindInput("query_seqlens", tensor(&query_, {1}));
    c.io->BindInput("logits_index", tensor(&index_, {1, 1}));
    c.io->BindOutput("logits", kv_tensor(logits_raw_.data(), {1, 1, a.vocab_size}));
    run(*c.io);
    c.held.insert(c.held.end(), ids, ids + n);  // only once the op has written them
    return as_float(logits_raw_, 0);
  }

 private:
  void allocate(FusedCache& c, int cap) {
    const auto& a = m_.model;
    size_t need = static_cast<size_t>(a.num_kv_heads) * cap * a.head_dim * elem_;
    c.io.reset();
    c.buffers.clear();
    for (size_t t = 0; t < past_names_.size(); ++t) {
      auto* p = static_cast<uint8_t*>(std::calloc(need, 1));
      if (!p) throw std::bad_alloc();
      c.buffers.emplace_back(p);
    }
    c.capacity = cap;
    c.held.clear();
    c.io = std::make_unique<Ort::IoBinding>(*session_);
    for (size_t t = 0; t < past_names_.size(); ++t) {
      c.io->BindInput(past_names_[t].c_str(), kv_tensor(c.buffers[t].get(), {1, a.num_kv_heads, cap, a.head_dim}));
      c.io->BindOutput(present_names_[t].c_str(), kv_tensor(c.buffers[t].get(), {1, a.num_kv_heads, cap, a.head_dim}));
    }
  }

  FusedCache own_;  // mtrt_generate's: sized per call, a fresh sequence each time
  FusedCache* cur_ = &own_;
  std::vector<int64_t> ids_;
  int32_t seqlens_k_ = 0, total_len_ = 0, query_ = 0;
  int64_t index_ = 0;
};

}  // namespace

std::unique_ptr<Backend> Backend::open(const Manifest& m) {
  if (m.graph == "fused") return std::make_unique<FusedBackend>(m);
  return std::make_unique<PortableBackend>(m);
}

}  // namespace mtrt
