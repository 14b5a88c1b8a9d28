// Generation over a Backend, gpt-fast style small functions (runtime/generate.py's rules for one sequence):
// sampling, the context limit, prefill in chunks, one token per decode step, EOS and stop strings, and text
// streamed through the StreamDecoder (never half a UTF-8 character; text that may begin a stop string is held
// back until it cannot).
//
//   Generator gen(*backend, &tok);
//   Options o; o.max_new_tokens = 64;                        // greedy unless o.sampling.temperature > 0
//   Result r = gen.generate(prompt_ids, o, [](int64_t id, const std::string& piece) { std::cout << piece; return true; });
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backend.hpp"
#include "tokenizer.hpp"

namespace mtrt {

struct Sampling {
  double temperature = 0;  // 0: greedy
  double top_p = 1;        // 1: off
  int64_t top_k = 0;       // 0: off
  double repetition_penalty = 1;  // 1: off (HF's rule: divide positive logits, multiply negative ones)
  std::optional<uint64_t> seed;
};

// The flags' names in the caller's interface, for messages (the CLI: --max-new-tokens, --truncate).
struct Names {
  std::string max_new_tokens = "max_new_tokens", truncate = "truncate";
};

struct Options {
  int64_t max_new_tokens = 128;
  Sampling sampling;
  std::vector<std::string> stop;  // generation ends before the first of these (not in the text)
  bool ignore_eos = false;
  bool truncate = false;  // keep the last tokens of a prompt over the context limit (at least half of it)
  Names names;
};

struct Stats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens a session's cache held already (not fed again)
  double time_to_first_token_s = 0, decode_s = 0;
  double decode_tokens_per_s() const { return new_tokens > 1 && decode_s > 0 ? (new_tokens - 1) / decode_s : 0; }
};

struct Result {
  std::vector<int64_t> prompt, ids;  // the prompt as fed (truncated if asked), the new ids (no EOS)
  std::string text;
  Stats stats;
  std::string stop_reason;  // length | eos | stop | callback
  std::vector<double> token_times;  // seconds from the call to each new token
};

// Check every sampling value the way runtime/generate.py's SAMPLING_RULES do (Error names the field).
void check_sampling(const Sampling& s);

class Generator {
 public:
  Generator(Backend& backend, const Tokenizer* tok);
  std::vector<int64_t> fit_context(std::vector<int64_t> prompt, const Options& o) const;
  const float* prefill(const std::vector<int64_t>& prompt);
  const float* decode_one_token(int64_t token);
  // on_token(id, text it adds) -> false to stop; the text is "" where it is held back (a possible stop string's
  // start, an incomplete character); id -1 at the end hands over text still held back when EOS came.
  // `session`: a cache kept between calls (Backend::new_cache): the prompt is fed from the longest prefix of it
  // the cache holds (at most all but its last token, whose logits are needed), the rest of the cache is dropped.
  Result generate(const std::vector<int64_t>& prompt, const Options& o,
                  const std::function<bool(int64_t, const std::string&)>& on_token = {}, Cache* session = nullptr);
  int max_context() const { return max_context_; }

 private:
  Result run_decode(Result r, const float* logits, const Options& o,
                    const std::function<bool(int64_t, const std::string&)>& on_token, double t0);
  int64_t sample(const float* logits, const Sampling& s, const std::vector<int64_t>& seen);
  Backend& backend_;
  const Tokenizer* tok_;
  int max_context_, chunk_;
  std::vector<int64_t> eos_;
  std::mt19937_64 rng_;
};

}  // namespace mtrt
