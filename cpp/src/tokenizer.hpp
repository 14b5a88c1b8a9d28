// Token ids <-> text (runtime/tokenizer.py's rules), the streaming detokenizer, and the mistral-v1 chat format
// (runtime/chat.py: token-exact with mistral-common's InstructTokenizerV1).
//
//   Tokenizer tok = Tokenizer::for_export(manifest);       // tokenizer.model (sentencepiece): encode + decode
//   std::vector<int64_t> ids = tok.encode("Hello");         // no BOS; user text never becomes control tokens
//   StreamDecoder d(tok); for (id : ids) out += d.push(id); out += d.flush();   // == tok.decode(ids)
//
// A tokenizer.json (the demo model's GPT-2 byte-level BPE) is decoded here (ByteLevel decoder), not encoded:
// its pre-tokenizer and merges are the `tokenizers` library's job, so prompts for such a model come as ids.
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

  bool can_encode() const { return sp_ != nullptr; }
  std::vector<int64_t> encode(const std::string& text, bool bos = false) const;
  std::string decode(const std::vector<int64_t>& ids) const;  // control / special tokens skipped
  std::string id_to_piece(int64_t id) const;
  int vocab_size() const;
  int64_t bos_id = -1, eos_id = -1;  // -1: none
  bool add_bos = false;              // a raw text gets BOS (manifest tokenizer.add_bos)
  std::string path, kind;            // kind: sentencepiece | tokenizers

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<std::string> pieces_;  // tokenizer.json: id -> token text
  std::vector<char> special_;        // tokenizer.json: skipped by decode
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

// A conversation -> ids (runtime/chat.py). `messages` is the parsed JSON list; complete=true also takes one ending
// with a finished assistant message (the training / scoring form, its EOS included).
std::vector<int64_t> format_chat(const Tokenizer& tok, const json& messages, const std::string& chat_format,
                                 bool complete = false);
void check_messages(const json& messages);

// Text from a command line or a file must be UTF-8: Error naming `what` and the first bad byte.
void check_text(const std::string& text, const std::string& what);
size_t utf8_length(const std::string& s);  // code points

}  // namespace mtrt
