// The C ABI (include/mistral_trt.h) over the C++ runtime: every exception stops here and becomes a status code
// and a thread-local error string.
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "backend.hpp"
#include "generate.hpp"
#include "mistral_trt.h"
#include "tokenizer.hpp"

struct mtrt_model {
  mtrt::Manifest manifest;
  std::unique_ptr<mtrt::Backend> backend;
  std::unique_ptr<mtrt::Tokenizer> tok;  // null where the C++ runtime cannot read the tokenizer (then: ids)
  std::unique_ptr<mtrt::Generator> gen;
};

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return MTRT_OK;
  } catch (const mtrt::Error& e) {
    last_error = e.what();
    return MTRT_BAD_INPUT;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return MTRT_INTERNAL;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return MTRT_INTERNAL;
  } catch (...) {
    last_error = "internal error: unknown exception";
    return MTRT_INTERNAL;
  }
}

}  // namespace

extern "C" {

const char* mtrt_version(void) { return "0.1.0"; }
const char* mtrt_last_error(void) { return last_error.c_str(); }

void mtrt_default_params(mtrt_params* p) {
  if (!p) return;
  std::memset(p, 0, sizeof *p);
  p->max_new_tokens = 128, p->temperature = 0, p->top_p = 1, p->top_k = 0, p->repetition_penalty = 1;
}

mtrt_model* mtrt_open(const char* export_dir) {
  mtrt_model* out = nullptr;
  guarded([&] {
    if (!export_dir) throw mtrt::Error("export_dir: expected a folder, got NULL");
    auto m = std::make_unique<mtrt_model>();
    m->manifest = mtrt::Manifest::load(export_dir);
    m->backend = mtrt::Backend::open(m->manifest);
    try {
      m->tok = std::make_unique<mtrt::Tokenizer>(mtrt::Tokenizer::for_export(m->manifest));
    } catch (const mtrt::Error& e) {
      if (std::string(e.what()).find("only byte-level BPE") == std::string::npos) throw;
    }
    m->gen = std::make_unique<mtrt::Generator>(*m->backend, m->tok.get());
    out = m.release();
  });
  return out;
}

void mtrt_close(mtrt_model* model) { delete model; }

int64_t mtrt_info(const mtrt_model* m, const char* key) {
  if (!m || !key) return -1;
  std::string k = key;
  if (k == "vocab_size") return m->manifest.model.vocab_size;
  if (k == "max_context") return m->manifest.max_context;
  if (k == "num_layers") return m->manifest.model.num_layers;
  return -1;
}

int mtrt_tokenize(mtrt_model* m, int kind, const char* input, int64_t* ids, size_t capacity, size_t* count) {
  int status = guarded([&] {
    if (!m || !input || !count) throw mtrt::Error("mtrt_tokenize: model, input and count must not be NULL");
    if (!m->tok) throw mtrt::Error(m->manifest.folder + ": the C++ runtime cannot encode with this model's tokenizer; "
                                   "pass prompt ids (`mistral-trt tokenize` prints them)");
    std::vector<int64_t> out;
    std::string text = input;
    if (kind == MTRT_RAW) {
      mtrt::check_text(text, "prompt");
      out = m->tok->encode(text, m->tok->add_bos);
    } else if (kind == MTRT_PROMPT) {
      mtrt::check_text(text, "prompt");
      out = mtrt::format_chat(*m->tok, mtrt::json::array({{{"role", "user"}, {"content", text}}}), m->manifest.chat_format, false, m->manifest.chat_template);
    } else if (kind == MTRT_MESSAGES) {
      mtrt::json messages;
      try {
        messages = mtrt::json::parse(text);
      } catch (const mtrt::json::parse_error& e) {
        throw mtrt::Error(std::string("conversation: not valid JSON: ") + e.what());
      }
      mtrt::check_messages(messages);
      out = mtrt::format_chat(*m->tok, messages, m->manifest.chat_format, false, m->manifest.chat_template);
    } else {
      throw mtrt::Error("mtrt_tokenize: kind " + std::to_string(kind) + ": expected MTRT_PROMPT, MTRT_RAW or MTRT_MESSAGES");
    }
    *count = out.size();
    if (ids) std::memcpy(ids, out.data(), std::min(capacity, out.size()) * sizeof(int64_t));
  });
  if (status == MTRT_OK && (!ids || *count > capacity)) {
    last_error = "mtrt_tokenize: " + std::to_string(*count) + " ids, the buffer holds " + std::to_string(capacity);
    return MTRT_TOO_SMALL;
  }
  return status;
}

int mtrt_decode(mtrt_model* m, const int64_t* ids, size_t n, char* buf, size_t capacity, size_t* len) {
  return guarded([&] {
    if (!m || (!ids && n) || !len) throw mtrt::Error("mtrt_decode: model, ids and len must not be NULL");
    if (!m->tok) throw mtrt::Error(m->manifest.folder + ": the C++ runtime cannot read this model's tokenizer");
    std::string text = m->tok->decode(std::vector<int64_t>(ids, ids + n));
    *len = text.size();
    if (!buf || capacity < text.size() + 1)
      throw mtrt::Error("mtrt_decode: " + std::to_string(text.size() + 1) + " bytes needed, the buffer holds " +
                        std::to_string(capacity));
    std::memcpy(buf, text.c_str(), text.size() + 1);
  });
}

int mtrt_generate(mtrt_model* m, const int64_t* prompt, size_t prompt_len, const mtrt_params* params,
                  mtrt_on_token on_token, void* user, mtrt_stats* stats, double* token_times) {
  return guarded([&] {
    if (!m || (!prompt && prompt_len)) throw mtrt::Error("mtrt_generate: model and prompt must not be NULL");
    mtrt_params p;
    mtrt_default_params(&p);
    if (params) p = *params;
    mtrt::Options o;
    o.max_new_tokens = p.max_new_tokens, o.ignore_eos = p.ignore_eos != 0, o.truncate = p.truncate != 0;
    o.sampling.temperature = p.temperature, o.sampling.top_p = p.top_p, o.sampling.top_k = p.top_k;
    o.sampling.repetition_penalty = p.repetition_penalty;
    if (p.use_seed) o.sampling.seed = p.seed;
    if (o.sampling.temperature == 0 && (o.sampling.top_p != 1.0 || o.sampling.top_k != 0))
      throw mtrt::Error(std::string(o.sampling.top_p != 1.0 ? "top_p" : "top_k") +
                        " applies to sampling: set temperature > 0; without it decoding is greedy");
    if (p.stop_count < 0 || (p.stop_count && !p.stop)) throw mtrt::Error("stop: stop_count and stop disagree");
    for (int i = 0; i < p.stop_count; ++i) {
      if (!p.stop[i]) throw mtrt::Error("stop: string " + std::to_string(i) + " is NULL");
      o.stop.emplace_back(p.stop[i]);
    }
    std::function<bool(int64_t, const std::string&)> cb;
    if (on_token)
      cb = [&](int64_t id, const std::string& text) { return on_token(user, id, text.c_str(), text.size()) == 0; };
    mtrt::Result r = m->gen->generate(std::vector<int64_t>(prompt, prompt + prompt_len), o, cb);
    if (stats) {
      stats->prompt_tokens = static_cast<int32_t>(r.stats.prompt_tokens);
      stats->new_tokens = static_cast<int32_t>(r.stats.new_tokens);
      stats->time_to_first_token_s = r.stats.time_to_first_token_s;
      stats->decode_tokens_per_s = r.stats.decode_tokens_per_s();
      stats->stop_reason = r.stop_reason == "eos" ? 1 : r.stop_reason == "stop" ? 2 : r.stop_reason == "callback" ? 3 : 0;
    }
    if (token_times) std::copy(r.token_times.begin(), r.token_times.end(), token_times);
  });
}

}  // extern "C"
