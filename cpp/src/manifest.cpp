#include "manifest.hpp"

#include <cmath>
#include <functional>

#include "integrity.hpp"

namespace mtrt {

namespace {

constexpr int kSchemaVersion = 2;
const char* kOnnx = "model.onnx";
const char* kEngine = "model.engine";

bool is_int(const json& v) { return v.is_number_integer(); }  // a JSON integer: not 2.0, not true
bool is_num(const json& v) { return v.is_number() && std::isfinite(v.get<double>()); }
bool pos_int(const json& v) { return is_int(v) && v.get<int64_t>() > 0; }
// a model's sizes: positive and below 2**31 (held as int here; runtime/manifest.py's SIZE)
bool size_int(const json& v) { return pos_int(v) && v.get<int64_t>() < (int64_t{1} << 31); }
bool plain_name(const json& v) {
  if (!v.is_string()) return false;
  auto s = v.get<std::string>();
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
}

struct Rule {
  const char* key;
  std::function<bool(const json&)> ok;
  std::string expected;
};

Error fail(const std::string& where, const std::string& key, const std::string& expected, const json& got) {
  std::string shown = py_dumps(got);
  if (shown.size() > 200) shown = shown.substr(0, 200);
  return Error(where + ": field '" + key + "': expected " + expected + ", got " + shown);
}

void check(const json& obj, const std::vector<Rule>& rules, const std::string& where, const std::string& prefix) {
  for (const auto& r : rules) {
    if (!obj.contains(r.key)) throw Error(where + ": missing field '" + prefix + r.key + "'");
    if (!r.ok(obj[r.key])) throw fail(where, prefix + r.key, r.expected, obj[r.key]);
  }
}

std::string names(const json& list) {  // Python's str() of a list of strings: ['a', 'b']
  std::string out = "[";
  for (size_t i = 0; i < list.size(); ++i) out += (i ? ", " : "") + py_repr(list[i]);
  return out + "]";
}

void check_manifest(const json& raw, const std::string& where) {
  auto one_of = [](std::vector<std::string> xs) {
    return [xs](const json& v) {
      if (!v.is_string()) return false;
      for (const auto& x : xs)
        if (v.get<std::string>() == x) return true;
      return false;
    };
  };
  check(raw,
        {{"model", [](const json& v) { return v.is_object(); }, "an object"},
         {"dtype", one_of({"fp32", "fp16"}), "fp32 or fp16"},
         {"graph", one_of({"portable", "fused"}), "portable or fused"},
         {"inputs", [](const json& v) { return v.is_array() && !v.empty(); }, "a list of tensors"},
         {"outputs", [](const json& v) { return v.is_array() && !v.empty(); }, "a list of tensors"},
         {"bos_token_id", [](const json& v) { return v.is_null() || (is_int(v) && v.get<int64_t>() >= 0); },
          "null or a token id"},
         {"eos_token_id",
          [](const json& v) {
            if (!v.is_array()) return false;
            for (const auto& t : v)
              if (!is_int(t) || t.get<int64_t>() < 0) return false;
            return true;
          },
          "a list of token ids"},
         {"pad_token_id", [](const json& v) { return v.is_null() || (is_int(v) && v.get<int64_t>() >= 0); },
          "null or a token id"},
         {"chat_format", one_of({"mistral-v1", "template", "none"}), "mistral-v1 or template or none"},
         {"chat_template", [](const json& v) { return v.is_null() || v.is_string(); }, "null or a jinja2 template"},
         {"tokenizer", [](const json& v) { return v.is_object(); }, "an object"},
         {"tokenizer_files",
          [](const json& v) {
            if (!v.is_array() || v.empty()) return false;
            for (const auto& n : v)
              if (!plain_name(n)) return false;
            return true;
          },
          "a list of file names"},
         {"files",
          [](const json& v) {
            if (!v.is_object()) return false;
            for (auto it = v.begin(); it != v.end(); ++it)
              if (!plain_name(json(it.key()))) return false;
            return true;
          },
          "an object: file name -> sha256"},
         {"cache", [](const json& v) { return v.is_object(); }, "an object"},
         {"source", [](const json& v) { return v.is_object(); }, "an object"},
         {"versions", [](const json& v) { return v.is_object(); }, "an object"}},
        where, "");
  for (auto [key, list] : {std::pair{"verification", true}, {"precision", false}, {"dims", false}})
    if (raw.contains(key) && !(list ? raw[key].is_array() : raw[key].is_object()))
      throw fail(where, key, list ? "a list" : "an object", raw[key]);
  const json& model = raw["model"];
  std::vector<Rule> model_rules = {
      {"architecture", [](const json& v) { return v == "MistralForCausalLM"; }, "\"MistralForCausalLM\""},
      {"num_layers", size_int, "a positive integer below 2**31"},
      {"num_heads", size_int, "a positive integer below 2**31"},
      {"num_kv_heads", size_int, "a positive integer below 2**31"},
      {"head_dim", size_int, "a positive integer below 2**31"},
      {"hidden_size", size_int, "a positive integer below 2**31"},
      {"intermediate_size", size_int, "a positive integer below 2**31"},
      {"vocab_size", size_int, "a positive integer below 2**31"},
      {"max_position_embeddings", size_int, "a positive integer below 2**31"},
      {"rope_theta", [](const json& v) { return is_num(v) && v.get<double>() > 0; }, "a positive number"},
      {"sliding_window", [](const json& v) { return v.is_null() || pos_int(v); }, "null or a positive integer"},
      {"rms_norm_eps", [](const json& v) { return is_num(v) && v.get<double>() > 0; }, "a positive number"},
      {"tie_word_embeddings", [](const json& v) { return v.is_boolean(); }, "true or false"},
  };
  check(model, model_rules, where, "model.");
  if (model["num_heads"].get<int64_t>() % model["num_kv_heads"].get<int64_t>())
    throw fail(where, "model.num_kv_heads",
               "a divisor of model.num_heads (" + std::to_string(model["num_heads"].get<int64_t>()) + ")",
               model["num_kv_heads"]);
  int64_t vocab = model["vocab_size"].get<int64_t>();
  for (const char* key : {"bos_token_id", "pad_token_id"})
    if (!raw[key].is_null() && raw[key].get<int64_t>() >= vocab)
      throw fail(where, key, "null or a token id below model.vocab_size " + std::to_string(vocab), raw[key]);
  for (const auto& t : raw["eos_token_id"])
    if (t.get<int64_t>() >= vocab)
      throw fail(where, "eos_token_id", "token ids below model.vocab_size " + std::to_string(vocab), raw["eos_token_id"]);
  if (raw["chat_format"] == "template" && (raw["chat_template"].is_null() || raw["chat_template"].get<std::string>().empty()))
    throw fail(where, "chat_template", "a jinja2 template (chat_format is 'template')", raw["chat_template"]);
  for (const char* kind : {"inputs", "outputs"}) {
    for (size_t j = 0; j < raw[kind].size(); ++j) {
      const json& t = raw[kind][j];
      std::string at = std::string(kind) + "[" + std::to_string(j) + "]";
      if (!t.is_object()) throw fail(where, at, "an object with name, dtype, dims", t);
      check(t,
            {{"name", [](const json& v) { return v.is_string() && !v.get<std::string>().empty(); }, "a tensor name"},
             {"dtype", one_of({"int32", "int64", "float16", "float32"}), "int32, int64, float16 or float32"},
             {"dims",
              [](const json& v) {
                if (!v.is_array()) return false;
                for (const auto& d : v)
                  if (!(d.is_string() || (is_int(d) && d.get<int64_t>() >= 0))) return false;
                return true;
              },
              "a list of dimension names and sizes"}},
            where, at + ".");
    }
  }
  const json& files = raw["files"];
  for (auto it = files.begin(); it != files.end(); ++it) {
    const json& d = it.value();
    bool ok = d.is_string() && d.get<std::string>().size() == 64;
    if (ok)
      for (char c : d.get<std::string>()) ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    if (!ok) throw fail(where, "files." + it.key(), "a sha256 (64 lowercase hex digits)", d);
  }
  if (!files.contains(kOnnx) && !files.contains(kEngine))
    throw Error(where + ": field 'files': no sha256 for " + std::string(kOnnx));
  for (const auto& n : raw["tokenizer_files"])
    if (!files.contains(n.get<std::string>()))
      throw Error(where + ": field 'files': no sha256 for the tokenizer file " + n.get<std::string>());
  const json& tok = raw["tokenizer"];
  json tfiles = raw["tokenizer_files"];
  check(tok,
        {{"file",
          [&](const json& v) {
            for (const auto& n : tfiles)
              if (v == n) return true;
            return false;
          },
          "one of tokenizer_files " + names(tfiles)},
         {"vocab_size", [&](const json& v) { return is_int(v) && v.get<int64_t>() > 0 && v.get<int64_t>() <= vocab; },
          "a positive integer <= model.vocab_size " + std::to_string(vocab)},
         {"add_bos", [](const json& v) { return v.is_boolean(); }, "true or false"}},
        where, "tokenizer.");
  if (tok["add_bos"].get<bool>() && raw["bos_token_id"].is_null())
    throw fail(where, "bos_token_id", "a token id (tokenizer.add_bos is true)", nullptr);
  const json& window = model["sliding_window"];
  bool portable = raw["graph"] == "portable";
  int64_t mpe = model["max_position_embeddings"].get<int64_t>();
  check(raw["cache"],
        {{"position_ids", [&](const json& v) { return v == (portable ? "absolute" : "implicit"); },
          portable ? "\"absolute\"" : "\"implicit\""},
         {"keep",
          [&](const json& v) {
            return window.is_null() ? v.is_null() : (is_int(v) && v.get<int64_t>() == window.get<int64_t>() - 1);
          },
          window.is_null() ? "null (model.sliding_window is null)"
                           : std::to_string(window.get<int64_t>() - 1) + " (model.sliding_window - 1)"},
         {"max_context", [&](const json& v) { return is_int(v) && v.get<int64_t>() > 1 && v.get<int64_t>() <= mpe; },
          "an integer in [2, model.max_position_embeddings = " + std::to_string(mpe) + "]"},
         {"layout", [&](const json& v) { return v == (portable ? "double-buffer" : "in-place"); },
          portable ? "\"double-buffer\"" : "\"in-place\""}},
        where, "cache.");
}

json spec_json(const TensorSpec& t) { return json{{"name", t.name}, {"dtype", t.dtype}, {"dims", t.dims}}; }

}  // namespace

std::pair<std::vector<TensorSpec>, std::vector<TensorSpec>> Manifest::expected_io() const {
  const std::string f = dtype == "fp16" ? "float16" : "float32";
  bool portable = graph == "portable";
  std::vector<TensorSpec> in, out;
  if (portable) {
    in = {{"input_ids", "int64", json{"batch", "seq"}},
          {"attention_mask", "int64", json{"batch", "total"}},
          {"position_ids", "int64", json{"batch", "seq"}}};
  } else {
    in = {{"input_ids", "int64", json{"batch", "seq"}},
          {"seqlens_k", "int32", json{"batch"}},
          {"total_sequence_length", "int32", json::array()},
          {"query_seqlens", "int32", json{"batch"}},
          {"logits_index", "int64", json{"batch", "logits_len"}}};
  }
  std::string past = portable ? "past" : "capacity", present = portable ? "total" : "capacity";
  out.push_back({"logits", f, json{"batch", portable ? "seq" : "logits_len", model.vocab_size}});
  for (int i = 0; i < model.num_layers; ++i) {
    for (const char* kind : {"key", "value"}) {
      in.push_back({"past_key_values." + std::to_string(i) + "." + kind, f,
                    json{"batch", model.num_kv_heads, past, model.head_dim}});
      out.push_back({"present." + std::to_string(i) + "." + kind, f,
                     json{"batch", model.num_kv_heads, present, model.head_dim}});
    }
  }
  return {in, out};
}

Manifest Manifest::load(const std::string& folder_) {
  std::string folder = folder_;
  while (folder.size() > 1 && folder.back() == '/') folder.pop_back();
  std::string path = join_path(folder, "manifest.json");
  if (!is_file(path)) throw Error(path + ": no manifest (expected an export folder written by `mistral-trt export`)");
  json raw = read_json(path);
  if (!raw.is_object()) throw Error(path + ": expected a JSON object");
  json version = raw.contains("schema_version") ? raw["schema_version"] : json(nullptr);
  if (!(is_int(version) && version.get<int64_t>() == kSchemaVersion))
    throw Error(path + ": schema_version " + py_repr(version) + ", this runtime reads " + std::to_string(kSchemaVersion) +
                (is_int(version) && version.get<int64_t>() == 1 ? ": written by an older mistral-trt, export it again" : ""));
  check_manifest(raw, path);

  Manifest m;
  m.folder = folder, m.where = path;
  const json& a = raw["model"];
  m.model.num_layers = a["num_layers"].get<int>(), m.model.num_heads = a["num_heads"].get<int>();
  m.model.num_kv_heads = a["num_kv_heads"].get<int>(), m.model.head_dim = a["head_dim"].get<int>();
  m.model.hidden_size = a["hidden_size"].get<int>(), m.model.intermediate_size = a["intermediate_size"].get<int>();
  m.model.vocab_size = a["vocab_size"].get<int>(), m.model.max_position_embeddings = a["max_position_embeddings"].get<int>();
  m.model.rope_theta = a["rope_theta"].get<double>(), m.model.rms_norm_eps = a["rms_norm_eps"].get<double>();
  if (!a["sliding_window"].is_null()) m.model.sliding_window = a["sliding_window"].get<int>();
  m.model.tie_word_embeddings = a["tie_word_embeddings"].get<bool>();
  m.dtype = raw["dtype"].get<std::string>(), m.graph = raw["graph"].get<std::string>();
  for (const char* kind : {"inputs", "outputs"})
    for (const auto& t : raw[kind])
      (std::string(kind) == "inputs" ? m.inputs : m.outputs)
          .push_back({t["name"].get<std::string>(), t["dtype"].get<std::string>(), t["dims"]});
  if (!raw["bos_token_id"].is_null()) m.bos_token_id = raw["bos_token_id"].get<int64_t>();
  if (!raw["pad_token_id"].is_null()) m.pad_token_id = raw["pad_token_id"].get<int64_t>();
  for (const auto& t : raw["eos_token_id"]) m.eos_token_id.push_back(t.get<int64_t>());
  m.chat_format = raw["chat_format"].get<std::string>();
  if (raw["chat_template"].is_string()) m.chat_template = raw["chat_template"].get<std::string>();
  m.tokenizer_file = raw["tokenizer"]["file"].get<std::string>();
  m.tokenizer_vocab_size = raw["tokenizer"]["vocab_size"].get<int>();
  m.tokenizer_add_bos = raw["tokenizer"]["add_bos"].get<bool>();
  for (const auto& n : raw["tokenizer_files"]) m.tokenizer_files.push_back(n.get<std::string>());
  for (auto it = raw["files"].begin(); it != raw["files"].end(); ++it)
    m.files.emplace_back(it.key(), it.value().get<std::string>());
  m.max_context = raw["cache"]["max_context"].get<int>();
  if (!raw["cache"]["keep"].is_null()) m.keep = raw["cache"]["keep"].get<int>();
  if (raw.contains("precision") && raw["precision"].contains("name") && raw["precision"]["name"].is_string())
    m.precision = raw["precision"]["name"].get<std::string>();

  auto [want_in, want_out] = m.expected_io();
  for (auto [kind, got, exp] : {std::tuple{"inputs", &m.inputs, &want_in}, {"outputs", &m.outputs, &want_out}}) {
    if (m.graph == "fused" && std::string(kind) == "inputs") {
      bool has = false;
      for (const auto& t : *got) has = has || t.name == "logits_index";
      if (!has)
        throw Error(path + ": a fused graph without the logits_index input (exported before it existed); "
                           "export it again with `mistral-trt export --graph fused`");
    }
    size_t n = std::max(got->size(), exp->size());
    for (size_t i = 0; i < n; ++i) {
      bool same = i < got->size() && i < exp->size() && (*got)[i].name == (*exp)[i].name &&
                  (*got)[i].dtype == (*exp)[i].dtype && (*got)[i].dims == (*exp)[i].dims;
      if (same) continue;
      std::string shown = i < got->size() ? py_dumps(spec_json((*got)[i])) : "nothing";
      std::string expected = i < exp->size() ? py_dumps(spec_json((*exp)[i])) : "nothing";
      throw Error(path + ": field '" + kind + "[" + std::to_string(i) + "]': expected " + expected +
                  " for this model and graph '" + m.graph + "', got " + shown);
    }
  }
  return m;
}

void Manifest::check_files(bool full) const { mtrt::check_files(folder, files, where, full); }

}  // namespace mtrt
