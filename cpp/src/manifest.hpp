// manifest.json: the contract every runtime drives an export by (docs/manifest.md). Read and checked here with
// the rules and the one-line messages of runtime/manifest.py, so a hand-edited manifest fails the same way in
// either runtime.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common.hpp"

namespace mtrt {

struct ModelArgs {
  int num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, hidden_size = 0, intermediate_size = 0;
  int vocab_size = 0, max_position_embeddings = 0;
  double rope_theta = 0, rms_norm_eps = 0;
  std::optional<int> sliding_window;  // none: full attention (Mistral-7B v0.2); W: query i sees keys i-W+1..i
  bool tie_word_embeddings = false;
};

struct TensorSpec {
  std::string name, dtype;  // dtype: int64, int32, float32, float16
  json dims;                // sizes and the names of symbolic dimensions, as in the file
};

struct Manifest {
  std::string folder, where;  // the export folder and its manifest's path (error messages name it)
  ModelArgs model;
  std::string dtype, graph;  // fp32 | fp16; portable | fused
  std::vector<TensorSpec> inputs, outputs;
  std::optional<int64_t> bos_token_id, pad_token_id;
  std::vector<int64_t> eos_token_id;
  std::string chat_format;  // mistral-v1 | template | none
  std::string chat_template;  // the jinja2 template of chat_format "template" ("" otherwise)
  std::string tokenizer_file;
  int tokenizer_vocab_size = 0;
  bool tokenizer_add_bos = false;
  std::vector<std::string> tokenizer_files;
  std::vector<std::pair<std::string, std::string>> files;  // name -> sha256, in the manifest's order
  int max_context = 0;
  std::optional<int> keep;  // cache.keep: W - 1 with a sliding window
  std::string precision;    // precision.name, "" for a plain export

  // Read and check FOLDER/manifest.json. Error (one line, naming the field) on anything a runtime relies on.
  static Manifest load(const std::string& folder);
  // The tensors this model and graph must have (runtime/manifest.py: io_specs, fused_io_specs).
  std::pair<std::vector<TensorSpec>, std::vector<TensorSpec>> expected_io() const;
  void check_files(bool full = false) const;
};

}  // namespace mtrt
