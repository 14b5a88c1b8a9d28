#include "tokenizer.hpp"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <random>
#include <set>

#include "jinja.hpp"
#include "manifest.hpp"

namespace mtrt {

namespace {

// Length of the well-formed UTF-8 sequence at s[i] (Unicode Table 3-7), or 0 if none starts there.
size_t utf8_seq(const std::string& s, size_t i) {
  auto b = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0x100u; };
  unsigned c = b(0);
  auto in = [](unsigned x, unsigned lo, unsigned hi) { return x >= lo && x <= hi; };
  if (c < 0x80) return 1;
  if (in(c, 0xC2, 0xDF)) return in(b(1), 0x80, 0xBF) ? 2 : 0;
  if (c == 0xE0) return in(b(1), 0xA0, 0xBF) && in(b(2), 0x80, 0xBF) ? 3 : 0;
  if (in(c, 0xE1, 0xEC) || in(c, 0xEE, 0xEF)) return in(b(1), 0x80, 0xBF) && in(b(2), 0x80, 0xBF) ? 3 : 0;
  if (c == 0xED) return in(b(1), 0x80, 0x9F) && in(b(2), 0x80, 0xBF) ? 3 : 0;
  if (c == 0xF0) return in(b(1), 0x90, 0xBF) && in(b(2), 0x80, 0xBF) && in(b(3), 0x80, 0xBF) ? 4 : 0;
  if (in(c, 0xF1, 0xF3)) return in(b(1), 0x80, 0xBF) && in(b(2), 0x80, 0xBF) && in(b(3), 0x80, 0xBF) ? 4 : 0;
  if (c == 0xF4) return in(b(1), 0x80, 0x8F) && in(b(2), 0x80, 0xBF) && in(b(3), 0x80, 0xBF) ? 4 : 0;
  return 0;
}

// How many bytes of an ill-formed sequence at s[i] form one "maximal subpart" (replaced by one U+FFFD, as
// Rust's from_utf8_lossy and Python's errors="replace" do).
size_t maximal_subpart(const std::string& s, size_t i) {
  // the longest prefix of s[i:] that some well-formed sequence starts with (at least one byte); after the lead
  // byte's own rule every later byte is 80..BF, so one repeated continuation byte is enough to try completions
  for (size_t n = 3; n >= 2; --n) {
    if (i + n > s.size()) continue;
    for (unsigned x = 0x80; x <= 0xBF; ++x) {
      std::string c = s.substr(i, n);
      while (c.size() < 4) c += static_cast<char>(x);
      if (utf8_seq(c, 0) > n) return n;
    }
  }
  return 1;
}

std::string lossy_utf8(const std::string& bytes) {
  std::string out;
  for (size_t i = 0; i < bytes.size();) {
    size_t n = utf8_seq(bytes, i);
    if (n) {
      out.append(bytes, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += maximal_subpart(bytes, i);
    }
  }
  return out;
}

bool decode_utf8(const std::string& s, std::vector<uint32_t>& cps) {
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_seq(s, i);
    if (!n) return false;
    unsigned char c = s[i];
    uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
    for (size_t k = 1; k < n; ++k) cp = cp << 6 | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    cps.push_back(cp);
    i += n;
  }
  return true;
}

// GPT-2's bytes_to_unicode, inverted: the character a byte-level BPE token shows for each byte -> the byte.
const std::unordered_map<uint32_t, unsigned char>& byte_decoder() {
  static const auto table = [] {
    std::unordered_map<uint32_t, unsigned char> m;
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::set<int> have(bs.begin(), bs.end());
    for (int b : bs) m[b] = static_cast<unsigned char>(b);
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (!have.count(b)) m[256 + n++] = static_cast<unsigned char>(b);
    return m;
  }();
  return table;
}

// GPT-2's bytes_to_unicode: each byte -> the UTF-8 of the character a byte-level BPE token shows for it.
const std::vector<std::string>& byte_encoder() {
  static const auto table = [] {
    std::vector<std::string> out(256);
    for (const auto& [cp, byte] : byte_decoder()) {
      std::string u;
      if (cp < 0x80) {
        u += static_cast<char>(cp);
      } else {  // < 0x800 in this alphabet
        u += static_cast<char>(0xC0 | (cp >> 6));
        u += static_cast<char>(0x80 | (cp & 0x3F));
      }
      out[byte] = u;
    }
    return out;
  }();
  return table;
}

struct CodeRange {
  uint32_t lo, hi;
};
#include "unicode_ranges.inc"

template <size_t N>
bool in_ranges(const CodeRange (&rs)[N], uint32_t cp) {
  const CodeRange* it = std::upper_bound(rs, rs + N, cp, [](uint32_t c, const CodeRange& r) { return c < r.lo; });
  return it != rs && cp <= (it - 1)->hi;
}
bool is_letter(uint32_t c) { return in_ranges(kLetters, c); }
bool is_number(uint32_t c) { return in_ranges(kNumbers, c); }
bool is_space(uint32_t c) { return in_ranges(kWhiteSpace, c); }

}  // namespace

std::vector<std::string> gpt2_pretokenize(const std::string& text) {
  std::vector<uint32_t> cp;
  std::vector<size_t> at;  // byte offset of each code point, and the end
  for (size_t i = 0; i < text.size();) {
    size_t n = utf8_seq(text, i);
    if (!n) throw Error("text: not valid UTF-8");
    std::vector<uint32_t> one;
    decode_utf8(text.substr(i, n), one);
    cp.push_back(one[0]);
    at.push_back(i);
    i += n;
  }
  at.push_back(text.size());
  const size_t n = cp.size();
  std::vector<std::string> out;
  auto other = [&](uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    if (cp[i] == '\'' && i + 1 < n) {  // 's 't 're 've 'm 'll 'd
      auto is = [&](size_t k, char c) { return k < n && cp[k] == static_cast<uint32_t>(c); };
      if (is(i + 1, 's') || is(i + 1, 't') || is(i + 1, 'm') || is(i + 1, 'd')) j = i + 2;
      else if ((is(i + 1, 'r') && is(i + 2, 'e')) || (is(i + 1, 'v') && is(i + 2, 'e')) ||
               (is(i + 1, 'l') && is(i + 2, 'l')))
        j = i + 3;
    }
    if (j == i) {
      size_t k = cp[i] == ' ' && i + 1 < n ? i + 1 : i;  // " ?" then a class
      for (auto cls : {is_letter, is_number}) {
        if (j == i && cls(cp[k])) {
          j = k;
          while (j < n && cls(cp[j])) ++j;
        }
      }
      if (j == i && other(cp[k])) {
        j = k;
        while (j < n && other(cp[j])) ++j;
      }
    }
    if (j == i) {  // whitespace: \s+(?!\S), else \s+ (one character)
      while (j < n && is_space(cp[j])) ++j;
      if (j < n && j - i > 1) --j;  // leave the last space to the next token (its " ?")
    }
    out.push_back(text.substr(at[i], at[j] - at[i]));
    i = j;
  }
  return out;
}

std::vector<int64_t> Tokenizer::bpe_word(const std::string& word) const {
  std::vector<std::string> sym;
  for (unsigned char b : word) sym.push_back(byte_encoder()[b]);
  while (sym.size() > 1) {  // merge the lowest-ranked adjacent pair, every occurrence left to right (GPT-2's BPE)
    int best = -1;
    std::string left, right;
    for (size_t k = 0; k + 1 < sym.size(); ++k) {
      auto it = ranks_.find(sym[k] + " " + sym[k + 1]);
      if (it != ranks_.end() && (best < 0 || it->second < best)) best = it->second, left = sym[k], right = sym[k + 1];
    }
    if (best < 0) break;
    std::vector<std::string> merged;
    for (size_t k = 0; k < sym.size(); ++k) {
      if (k + 1 < sym.size() && sym[k] == left && sym[k + 1] == right) {
        merged.push_back(left + right);
        ++k;
      } else {
        merged.push_back(sym[k]);
      }
    }
    sym.swap(merged);
  }
  std::vector<int64_t> ids;
  for (const auto& s : sym) {
    auto it = vocab_.find(s);
    if (it == vocab_.end()) throw Error(path + ": no token for '" + s + "' (a byte-level vocabulary has every byte)");
    ids.push_back(it->second);
  }
  return ids;
}

size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

void check_text(const std::string& text, const std::string& what) {
  size_t chars = 0;
  for (size_t i = 0; i < text.size();) {
    size_t n = utf8_seq(text, i);
    if (!n) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "%02x", static_cast<unsigned char>(text[i]));
      throw Error(what + ": not valid UTF-8 (byte 0x" + hex + " at character " + std::to_string(chars) + ")");
    }
    i += n, ++chars;
  }
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  if (!is_file(path)) throw Error(path + ": no such tokenizer file");
  Tokenizer t;
  t.path = path;
  std::string dir = path.substr(0, path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/'));
  json cfg = json::object();
  std::string cfg_path = join_path(dir, "tokenizer_config.json");
  if (is_file(cfg_path)) {
    cfg = read_json(cfg_path);
    if (!cfg.is_object()) throw Error(cfg_path + ": expected a JSON object");
  }
  if (path.size() >= 5 && path.substr(path.size() - 5) == ".json") {
    t.kind = "tokenizers";
    // a vocabulary of 49k keys: nlohmann::json's std::map, not ordered_json's linear lookups (seconds, not ms)
    nlohmann::json tj;
    try {
      tj = nlohmann::json::parse(read_file(path));
    } catch (const nlohmann::json::parse_error& e) {
      throw Error(path + ": not a tokenizers JSON file: " + e.what());
    }
    const nlohmann::json* vocab = tj.contains("model") && tj["model"].contains("vocab") ? &tj["model"]["vocab"] : nullptr;
    if (!vocab || !vocab->is_object()) throw Error(path + ": not a tokenizers JSON file with a model vocabulary");
    if (vocab->empty()) throw Error(path + ": the model vocabulary is empty");
    bool byte_level = tj.contains("decoder") && tj["decoder"].is_object() && tj["decoder"].value("type", "") == "ByteLevel";
    if (!byte_level)
      throw Error(path + ": the C++ runtime decodes only byte-level BPE tokenizer.json files (decoder ByteLevel); "
                         "use the Python runtime for this one");
    int64_t top = -1;
    for (auto it = vocab->begin(); it != vocab->end(); ++it) top = std::max<int64_t>(top, it.value().get<int64_t>());
    if (tj.contains("added_tokens"))
      for (const auto& a : tj["added_tokens"]) top = std::max<int64_t>(top, a["id"].get<int64_t>());
    t.pieces_.assign(top + 1, std::string());
    t.special_.assign(top + 1, 0);
    t.strip_.assign(top + 1, {0, 0});
    for (auto it = vocab->begin(); it != vocab->end(); ++it) t.pieces_[it.value().get<int64_t>()] = it.key();
    if (tj.contains("added_tokens"))
      for (const auto& a : tj["added_tokens"]) {
        int64_t id = a["id"].get<int64_t>();
        t.pieces_[id] = a["content"].get<std::string>();
        t.special_[id] = a.value("special", false);
        t.strip_[id] = {a.value("lstrip", false), a.value("rstrip", false)};
      }
    auto token_id = [&](const char* key) -> int64_t {
      if (!cfg.contains(key)) return -1;
      json v = cfg[key];
      if (v.is_object()) v = v.value("content", json());
      if (!v.is_string()) return -1;
      for (size_t i = 0; i < t.pieces_.size(); ++i)
        if (t.pieces_[i] == v.get<std::string>()) return static_cast<int64_t>(i);
      return -1;
    };
    t.bos_id = token_id("bos_token"), t.eos_id = token_id("eos_token");
    // encoding: GPT-2's byte-level BPE only (what the demo model and most BPE checkpoints are)
    const auto& model = tj["model"];
    const auto pre = tj.value("pre_tokenizer", nlohmann::json());
    if (!tj.value("normalizer", nlohmann::json()).is_null()) t.why_not_bpe_ = "it has a normalizer";
    else if (!pre.is_object() || pre.value("type", "") != "ByteLevel" || !pre.value("use_regex", true) ||
             pre.value("add_prefix_space", false))
      t.why_not_bpe_ = "its pre-tokenizer is not ByteLevel with GPT-2's pattern and no prefix space";
    else if (model.value("type", "") != "BPE" || !model.contains("merges") || model.value("ignore_merges", false) ||
             [&] {  // null or "" both mean none
               for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
                 auto v = model.value(k, nlohmann::json());
                 if (!v.is_null() && !(v.is_string() && v.get<std::string>().empty())) return true;
               }
               return false;
             }())
      t.why_not_bpe_ = "its model is not a plain BPE";
    if (t.why_not_bpe_.empty()) {
      for (auto it = vocab->begin(); it != vocab->end(); ++it) t.vocab_[it.key()] = it.value().get<int64_t>();
      int rank = 0;
      for (const auto& m : model["merges"]) {
        std::string key = m.is_string() ? m.get<std::string>()
                                        : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>();
        t.ranks_.emplace(key, rank++);
      }
      t.bpe_ = true;
    }
    return t;
  }
  t.kind = "sentencepiece";
  t.sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  auto st = t.sp_->Load(path);
  if (!st.ok()) throw Error(path + ": not a sentencepiece model: " + st.ToString());
  t.bos_id = t.sp_->bos_id() >= 0 ? t.sp_->bos_id() : -1;
  t.eos_id = t.sp_->eos_id() >= 0 ? t.sp_->eos_id() : -1;
  bool explicit_bos = cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean();
  t.add_bos = (explicit_bos ? cfg["add_bos_token"].get<bool>() : true) && t.bos_id >= 0;  // LlamaTokenizer's default
  return t;
}

Tokenizer Tokenizer::for_export(const Manifest& m) {
  Tokenizer t = load(join_path(m.folder, m.tokenizer_file));
  t.add_bos = m.tokenizer_add_bos;
  if (t.vocab_size() != m.tokenizer_vocab_size)
    throw Error(t.path + ": " + std::to_string(t.vocab_size()) + " tokens, " + m.where + " says tokenizer.vocab_size " +
                std::to_string(m.tokenizer_vocab_size) + ": not this model's tokenizer");
  if (t.bos_id >= 0 && m.bos_token_id && t.bos_id != *m.bos_token_id)
    throw Error(t.path + ": its bos token is id " + std::to_string(t.bos_id) + ", " + m.where + " says bos_token_id " +
                std::to_string(*m.bos_token_id) + ": not this model's tokenizer");
  if (t.eos_id >= 0 && !m.eos_token_id.empty() &&
      std::find(m.eos_token_id.begin(), m.eos_token_id.end(), t.eos_id) == m.eos_token_id.end()) {
    std::string list = "[";
    for (size_t i = 0; i < m.eos_token_id.size(); ++i) list += (i ? ", " : "") + std::to_string(m.eos_token_id[i]);
    throw Error(t.path + ": its eos token is id " + std::to_string(t.eos_id) + ", " + m.where + " says eos_token_id " +
                list + "]: not this model's tokenizer");
  }
  return t;
}

int Tokenizer::vocab_size() const {
  if (sp_) return sp_->GetPieceSize();
  return static_cast<int>(pieces_.size());
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool bos) const {
  check_text(text, "text");
  std::vector<int64_t> out;
  if (bos) {
    if (bos_id < 0) throw Error(path + ": this tokenizer has no BOS token");
    out.push_back(bos_id);
  }
  if (sp_) {
    std::vector<int> ids;
    auto st = sp_->Encode(text, &ids);
    if (!st.ok()) throw Error(path + ": cannot encode: " + st.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
  }
  if (!bpe_)
    throw Error(path + ": the C++ runtime encodes only GPT-2 byte-level BPE tokenizer.json files, and " + why_not_bpe_ +
                ": pass the prompt as --ids (`mistral-trt tokenize` prints them)");
  for (const auto& word : gpt2_pretokenize(text)) {  // text is text: special tokens typed in it are characters
    auto ids = bpe_word(word);
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  if (sp_) {
    std::vector<int> v(ids.begin(), ids.end());
    for (int& i : v)
      if (i < 0 || i >= sp_->GetPieceSize()) i = sp_->unk_id();
    std::string text;
    auto st = sp_->Decode(v, &text);
    if (!st.ok()) throw Error(path + ": cannot decode: " + st.ToString());
    return text;
  }
  // tokenizers' ByteLevel decoder: each token's characters back to bytes (a token with a character outside the
  // byte alphabet, e.g. an added token, contributes its own UTF-8), then the bytes as UTF-8, lossily
  const auto& table = byte_decoder();
  std::string bytes;
  for (int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(pieces_.size()) || special_[id]) continue;
    std::vector<uint32_t> cps;
    std::string piece;
    bool all = decode_utf8(pieces_[id], cps);
    for (uint32_t c : cps) {
      auto it = table.find(c);
      if (it == table.end()) {
        all = false;
        break;
      }
      piece += static_cast<char>(it->second);
    }
    bytes += all ? piece : pieces_[id];
  }
  return lossy_utf8(bytes);
}

std::vector<int64_t> Tokenizer::encode_segments(const std::vector<std::pair<std::string, bool>>& segments) const {
  struct Special {
    std::string text;
    int64_t id;
    bool lstrip, rstrip;
  };
  std::vector<Special> specials;  // longest first, so "<|im_start|>" wins over a shorter token it contains
  if (sp_) {
    for (int i = 0; i < sp_->GetPieceSize(); ++i)
      if (sp_->IsControl(i)) specials.push_back({sp_->IdToPiece(i), i, false, false});
  } else {
    for (size_t i = 0; i < pieces_.size(); ++i)
      if (special_[i]) specials.push_back({pieces_[i], static_cast<int64_t>(i), strip_[i].first != 0, strip_[i].second != 0});
  }
  std::stable_sort(specials.begin(), specials.end(),
                   [](const Special& a, const Special& b) { return a.text.size() > b.text.size(); });
  auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  std::vector<int64_t> ids;
  std::string text;
  bool strip_next = false;
  auto flush = [&] {
    if (!text.empty()) {
      auto more = encode(text);
      ids.insert(ids.end(), more.begin(), more.end());
    }
    text.clear();
  };
  for (const auto& [chunk, from_user] : segments) {
    if (from_user) {
      text += chunk;
      continue;
    }
    for (size_t i = 0; i < chunk.size();) {
      const Special* hit = nullptr;
      for (const auto& sp : specials)
        if (!sp.text.empty() && chunk.compare(i, sp.text.size(), sp.text) == 0) {
          hit = &sp;
          break;
        }
      if (!hit) {
        text += chunk[i++];
        continue;
      }
      if (strip_next) {
        size_t a = 0;
        while (a < text.size() && ws(text[a])) ++a;
        text.erase(0, a);
      }
      if (hit->lstrip)
        while (!text.empty() && ws(text.back())) text.pop_back();
      flush();
      ids.push_back(hit->id);
      strip_next = hit->rstrip;
      i += hit->text.size();
    }
  }
  if (strip_next) {
    size_t a = 0;
    while (a < text.size() && ws(text[a])) ++a;
    text.erase(0, a);
  }
  flush();
  return ids;
}

std::string Tokenizer::id_to_piece(int64_t id) const {
  if (sp_) return sp_->IdToPiece(static_cast<int>(id));
  return id >= 0 && id < static_cast<int64_t>(pieces_.size()) ? pieces_[id] : "";
}

// -- streaming ---------------------------------------------------------------------------------------------
namespace {
const std::string kReplacement = "\xEF\xBF\xBD";
bool ends_with_replacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, kReplacement) == 0;
}
std::string tail_chars(const std::string& s, size_t chars) {  // s without its first `chars` code points
  size_t i = 0, n = 0;
  while (i < s.size() && n < chars) {
    ++i;
    while (i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) ++i;
    ++n;
  }
  return s.substr(i);
}
}  // namespace

std::string StreamDecoder::push(int64_t id) {
  ids_.push_back(id);
  std::string before = tok_.decode({ids_.begin() + prefix_, ids_.begin() + read_});
  std::string now = tok_.decode({ids_.begin() + prefix_, ids_.end()});
  size_t nb = utf8_length(before), nn = utf8_length(now);
  if (nn > nb && !ends_with_replacement(now)) {
    prefix_ = read_, read_ = ids_.size();
    return tail_chars(now, nb);
  }
  return "";
}

std::string StreamDecoder::flush() {
  std::string before = tok_.decode({ids_.begin() + prefix_, ids_.begin() + read_});
  std::string now = tok_.decode({ids_.begin() + prefix_, ids_.end()});
  prefix_ = read_ = ids_.size();
  return tail_chars(now, utf8_length(before));
}

// -- chat ----------------------------------------------------------------------------------------------------
namespace {

const char* kFinished =
    "conversation: it ends with a finished assistant message, so there is nothing to answer; end it with a user "
    "message, or mark the assistant message \"prefix\": true to continue it";

bool may_follow(const std::string& prev, const std::string& cur) {  // mistral-common's rule for chat requests
  if (prev == "assistant") return cur == "assistant" || cur == "user";
  return true;  // system and user may be followed by any role
}

std::string join(const std::vector<std::string>& parts) {
  std::string out;
  for (const auto& p : parts) {
    if (p.empty()) continue;  // empty contents are skipped when joining (no stray blank lines)
    out += (out.empty() ? "" : "\n\n") + p;
  }
  return out;
}

// The content of a final assistant message marked "prefix": true, or nullptr.
const json* final_prefix(const json& messages) {
  check_messages(messages);
  const json& last = messages.back();
  std::string at = "conversation message " + std::to_string(messages.size() - 1);
  if (last.contains("prefix") && !last["prefix"].is_null() && !last["prefix"].is_boolean())
    throw Error(at + ": \"prefix\" must be true or false");
  if (!last.contains("prefix") || !last["prefix"].is_boolean() || !last["prefix"].get<bool>()) return nullptr;
  if (last["role"] != "assistant") throw Error(at + ": \"prefix\": true is for a final assistant message");
  return &last["content"];
}

std::vector<int64_t> mistral_v1(const Tokenizer& tok, const json& messages, bool complete) {
  if (const json* prefix = final_prefix(messages)) {
    if (messages.size() < 2) throw Error("conversation: a prefix assistant message needs a user message before it");
    json head = json::array();
    for (size_t i = 0; i + 1 < messages.size(); ++i) head.push_back(messages[i]);
    auto ids = mistral_v1(tok, head, false);
    auto more = tok.encode(prefix->get<std::string>());
    ids.insert(ids.end(), more.begin(), more.end());
    return ids;
  }
  for (size_t i = 1; i < messages.size(); ++i) {
    std::string prev = messages[i - 1]["role"], cur = messages[i]["role"];
    if (!may_follow(prev, cur))
      throw Error("conversation message " + std::to_string(i) + ": role '" + cur + "' cannot follow '" + prev + "'");
  }
  for (size_t i = 0; i < messages.size(); ++i)
    if (messages[i]["role"] == "assistant" && messages[i]["content"].get<std::string>().empty())
      throw Error("conversation message " + std::to_string(i) + ": assistant message with empty content");
  std::vector<std::string> systems;
  for (const auto& m : messages)
    if (m["role"] == "system") systems.push_back(m["content"]);
  std::string system = join(systems);
  std::vector<std::pair<std::string, std::vector<std::string>>> turns;  // a system message ends a run of one role
  std::string prev;
  for (const auto& m : messages) {
    std::string role = m["role"];
    if (role != "system") {
      if (prev == role)
        turns.back().second.push_back(m["content"]);
      else
        turns.push_back({role, {m["content"].get<std::string>()}});
    }
    prev = role;
  }
  if (turns.empty() || turns[0].first != "user") turns.insert(turns.begin(), {"user", {""}});
  if (turns.back().first != "user" && !complete) throw Error(kFinished);
  std::vector<int64_t> ids = {tok.bos_id};
  for (size_t n = 0; n < turns.size(); ++n) {
    std::string content = join(turns[n].second);
    std::vector<int64_t> more;
    if (turns[n].first == "user") {
      if (n == 0 && !system.empty()) content = system + "\n\n" + content;
      more = tok.encode("[INST] " + content + " [/INST]");
    } else {
      more = tok.encode(content);
      more.push_back(tok.eos_id);
    }
    ids.insert(ids.end(), more.begin(), more.end());
  }
  return ids;
}

json render(const std::string& tmpl, const json& messages, const Tokenizer& tok, bool gen) {
  check_messages(messages);
  return jinja::render(tmpl, json{{"messages", messages}, {"add_generation_prompt", gen},
                                  {"bos_token", tok.bos_id >= 0 ? tok.id_to_piece(tok.bos_id) : ""},
                                  {"eos_token", tok.eos_id >= 0 ? tok.id_to_piece(tok.eos_id) : ""}});
}

// runtime/chat.py's template_segments: render once with each content replaced by a unique marker and once for real,
// and walk both, so the template's own text and the messages' contents are told apart.
std::vector<int64_t> template_chat(const Tokenizer& tok, const json& messages, const std::string& tmpl, bool complete) {
  const json* prefix = final_prefix(messages);
  bool finished = !prefix && messages.back()["role"] == "assistant";
  if (finished && !complete) throw Error(kFinished);
  bool gen = !prefix && !finished;
  std::string real = render(tmpl, messages, tok, gen).get<std::string>();
  std::string nonce;
  std::random_device rd;
  for (int k = 0; k < 4; ++k) nonce += std::to_string(rd());
  json marks = messages;
  for (size_t i = 0; i < marks.size(); ++i) marks[i]["content"] = std::string(1, '\0') + nonce + ":" + std::to_string(i) + '\0';
  std::string marked = render(tmpl, marks, tok, gen).get<std::string>();
  std::vector<std::string> parts;  // template text, content index, template text, ..., template text
  std::string open = std::string(1, '\0') + nonce + ":";
  for (size_t a = 0;;) {
    size_t p = marked.find(open, a);
    if (p == std::string::npos) {
      parts.push_back(marked.substr(a));
      break;
    }
    size_t q = marked.find('\0', p + open.size());
    parts.push_back(marked.substr(a, p - a));
    parts.push_back(marked.substr(p + open.size(), q - p - open.size()));
    a = q + 1;
  }
  auto starts = [&](const std::string& s, size_t at) { return real.compare(at, s.size(), s) == 0; };
  std::vector<std::pair<std::string, bool>> out;
  size_t pos = 0;
  for (size_t k = 0; k < parts.size(); ++k) {
    if (k % 2 == 0) {
      if (!starts(parts[k], pos))
        throw Error("chat template: it renders message contents differently from plain text "
                    "(cannot tell user text from the template's markup)");
      out.push_back({parts[k], false});
      pos += parts[k].size();
      continue;
    }
    size_t idx = std::stoul(parts[k]);
    std::string content = messages[idx]["content"], after = parts[k + 1];
    auto lstrip = [](std::string s) { size_t a = 0; while (a < s.size() && std::isspace(static_cast<unsigned char>(s[a]))) ++a; return s.substr(a); };
    auto rstrip = [](std::string s) { while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back(); return s; };
    std::string found;
    bool ok = false;
    for (const std::string& cand : {content, rstrip(lstrip(content)), lstrip(content), rstrip(content)})
      if (starts(cand, pos) && starts(after, pos + cand.size())) {
        found = cand, ok = true;
        break;
      }
    if (!ok)
      throw Error("chat template: it changes the content of message " + parts[k] +
                  " in a way this runtime cannot follow (only trimming is supported)");
    out.push_back({found, true});
    pos += found.size();
    if (prefix && idx == messages.size() - 1) {  // the reply continues right after the final message's text
      std::vector<std::pair<std::string, bool>> kept;
      for (auto& s : out)
        if (!s.first.empty()) kept.push_back(s);
      return tok.encode_segments(kept);
    }
  }
  if (pos != real.size()) throw Error("chat template: renders differently from one call to the next");
  if (prefix) throw Error("chat template: it does not render the final assistant message, so it cannot be continued");
  std::vector<std::pair<std::string, bool>> kept;
  for (auto& s : out)
    if (!s.first.empty()) kept.push_back(s);
  return tok.encode_segments(kept);
}

}  // namespace

void check_messages(const json& messages) {
  if (!messages.is_array() || messages.empty())
    throw Error("conversation: expected a non-empty list of {\"role\": ..., \"content\": ...}");
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    std::string at = "conversation message " + std::to_string(i);
    if (!m.is_object() || !m.contains("role") || !m.contains("content"))
      throw Error(at + ": expected an object with \"role\" and \"content\"");
    const json& role = m["role"];
    if (!(role == "system" || role == "user" || role == "assistant"))
      throw Error(at + ": unknown role " + py_repr(role) + ", expected one of system, user, assistant");
    if (!m["content"].is_string()) throw Error(at + ": content must be a string");
    check_text(m["content"].get<std::string>(), at + " content");
  }
}

std::vector<int64_t> format_chat(const Tokenizer& tok, const json& messages, const std::string& chat_format,
                                 bool complete, const std::string& chat_template) {
  if (chat_format == "mistral-v1") return mistral_v1(tok, messages, complete);
  if (chat_format == "template") {
    if (chat_template.empty()) throw Error("chat_format 'template' but no chat template in the manifest");
    return template_chat(tok, messages, chat_template, complete);
  }
  throw Error("chat format '" + chat_format + "': this model has no chat format; use a raw prompt");
}

}  // namespace mtrt
