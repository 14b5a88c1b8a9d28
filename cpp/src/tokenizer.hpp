// Token ids <-> text (runtime/tokenizer.py's rules), the streaming detokenizer, and the mistral-v1 chat format
// (runtime/chat.py: token-exact with mistral-common's InstructTokenizerV1).
//
//   Tokenizer tok = Tokenizer::for_export(manifest);       // tokenizer.model (sentencepiece): encode + decode
//   std::vector<int64_t> ids = tok.encode("Hello");         // no BOS; user text never becomes control tokens
//   StreamDecoder d(tok); for (id : ids) out += d.push(id); out += d.flush();   // == tok.decode(ids)
//
// A tokenizer.json of the GPT-2 byte-level BPE kind (the demo model's: ByteLevel pre-tokenizer with GPT-2's pattern,
// BPE merges, ByteLevel decoder) is encoded and decoded here, id for id as the `tokenizers` library does; another
// kind of tokenizer.json decodes only, and its prompts come as ids.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.hpp"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace mtrt {

struct Manifest;

class Tokenizer {
 public:
  static Tokenizer load(const std::string& path);  // tokenizer.model or tokenizer.json
  static Tokenizer for_export(const Manifest& m);  // the file the manifest names, checked against it
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  bool can_encode() const { return sp_ != nullptr || bpe_; }
  std::vector<int64_t> encode(const std::string& text, bool bos = false) const;
  std::string decode(const std::vector<int64_t>& ids) const;  // control / special tokens skipped
  std::string id_to_piece(int64_t id) const;
  // Ids of a text assembled from pieces: (text, false) from the program (a chat template's markup, whose special
  // tokens become their ids) and (text, true) from the user (always text). runtime/tokenizer.py's encode_segments.
  std::vector<int64_t> encode_segments(const std::vector<std::pair<std::string, bool>>& segments) const;
  int vocab_size() const;
  int64_t bos_id = -1, eos_id = -1;  // -1: none
  bool add_bos = false;              // a raw text gets BOS (manifest tokenizer.add_bos)
  std::string path, kind;            // kind: sentencepiece | tokenizers

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<std::string> pieces_;  // tokenizer.json: id -> token text
  std::vector<char> special_;        // tokenizer.json: skipped by decode
  std::vector<std::pair<char, char>> strip_;  // tokenizer.json: an added token's (lstrip, rstrip)
  bool bpe_ = false;                 // tokenizer.json: a byte-level BPE this runtime encodes
  std::string why_not_bpe_;          // else: which part of it is another kind
  std::unordered_map<std::string, int64_t> vocab_;  // token text -> id
  std::unordered_map<std::string, int> ranks_;      // "left right" -> merge rank
  std::vector<int64_t> bpe_word(const std::string& word) const;
};

// Push ids one at a time, get the text they add; never half a UTF-8 character (runtime/tokenizer.py's
// StreamDecoder: a short window of ids is decoded and only what it gained is emitted).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int64_t id);
  std::string flush();

 private:
  const Tokenizer& tok_;
  std::vector<int64_t> ids_;
  size_t prefix_ = 0, read_ = 0;
};

// GPT-2's pre-tokenizer pattern, as code point ranges (letters \p{L}, numbers \p{N}, \s), over UTF-8 text:
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<std::string> gpt2_pretokenize(const std::string& text);

// A conversation -> ids (runtime/chat.py). `messages` is the parsed JSON list; complete=true also takes one ending
// with a finished assistant message (the training / scoring form, its EOS included).
// chat_format "template": the checkpoint's jinja2 chat template (cpp/src/jinja.cpp renders it as transformers does;
// only the template's own markup may become special tokens, message contents stay text: runtime/chat.py's
// template_segments).
std::vector<int64_t> format_chat(const Tokenizer& tok, const json& messages, const std::string& chat_format,
                                 bool complete = false, const std::string& chat_template = "");
void check_messages(const json& messages);

// Text from a command line or a file must be UTF-8: Error naming `what` and the first bad byte.
void check_text(const std::string& text, const std::string& what);
size_t utf8_length(const std::string& s);  // code points

}  // namespace mtrt
