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

struct mtrt_session {
  mtrt_model* model;
  std::unique_ptr<mtrt::Cache> cache;  // null with the portable graph (each turn fed whole)
  mtrt::json messages = mtrt::json::array();
  std::vector<int64_t> ids;
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

namespace {

mtrt::Options options(const mtrt_params* params) {
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
  return o;
}

mtrt::Result run(mtrt_model* m, const std::vector<int64_t>& prompt, const mtrt_params* params, mtrt_on_token on_token,
                 void* user, mtrt_stats* stats, double* token_times, mtrt::Cache* cache) {
  mtrt::Options o = options(params);
  std::function<bool(int64_t, const std::string&)> cb;
  if (on_token)
    cb = [&](int64_t id, const std::string& text) { return on_token(user, id, text.c_str(), text.size()) == 0; };
  mtrt::Result r = m->gen->generate(prompt, o, cb, cache);
  if (stats) {
    stats->prompt_tokens = static_cast<int32_t>(r.stats.prompt_tokens);
    stats->new_tokens = static_cast<int32_t>(r.stats.new_tokens);
    stats->time_to_first_token_s = r.stats.time_to_first_token_s;
    stats->decode_tokens_per_s = r.stats.decode_tokens_per_s();
    stats->stop_reason = r.stop_reason == "eos" ? 1 : r.stop_reason == "stop" ? 2 : r.stop_reason == "callback" ? 3 : 0;
    stats->cached_tokens = static_cast<int32_t>(r.stats.cached_tokens);
  }
  if (token_times) std::copy(r.token_times.begin(), r.token_times.end(), token_times);
  return r;
}

void need_tokenizer(const mtrt_model* m) {
  if (!m->tok) throw mtrt::Error(m->manifest.folder + ": the C++ runtime cannot encode with this model's tokenizer; "
                                 "pass prompt ids (`mistral-trt tokenize` prints them)");
}

}  // namespace

extern "C" {

const char* mtrt_version(void) { return "0.2.0"; }
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
    run(m, std::vector<int64_t>(prompt, prompt + prompt_len), params, on_token, user, stats, token_times, nullptr);
  });
}

mtrt_session* mtrt_session_open(mtrt_model* m) {
  mtrt_session* out = nullptr;
  guarded([&] {
    if (!m) throw mtrt::Error("mtrt_session_open: model must not be NULL");
    auto s = std::make_unique<mtrt_session>();
    s->model = m;
    s->cache = m->backend->new_cache(m->gen->max_context());
    out = s.release();
  });
  return out;
}

int mtrt_session_append(mtrt_session* s, const char* role, const char* content) {
  return guarded([&] {
    if (!s || !role || !content) throw mtrt::Error("mtrt_session_append: session, role and content must not be NULL");
    if (!s->ids.empty()) throw mtrt::Error("mtrt_session_append: this session holds ids; a session holds messages or "
                                           "ids (mtrt_session_reset clears it)");
    need_tokenizer(s->model);
    std::string r = role, text = content;
    if (r != "system" && r != "user" && r != "assistant")
      throw mtrt::Error("role '" + r + "': expected system, user or assistant");
    mtrt::check_text(text, "content");
    s->messages.push_back({{"role", r}, {"content", text}});
  });
}

int mtrt_session_append_ids(mtrt_session* s, const int64_t* ids, size_t n) {
  return guarded([&] {
    if (!s || (!ids && n)) throw mtrt::Error("mtrt_session_append_ids: session and ids must not be NULL");
    if (!s->messages.empty()) throw mtrt::Error("mtrt_session_append_ids: this session holds messages; a session "
                                                "holds messages or ids (mtrt_session_reset clears it)");
    int64_t vocab = s->model->manifest.model.vocab_size;
    for (size_t i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= vocab)
        throw mtrt::Error("ids must lie in [0, " + std::to_string(vocab) + "), got " + std::to_string(ids[i]));
    s->ids.insert(s->ids.end(), ids, ids + n);
  });
}

int mtrt_session_generate(mtrt_session* s, const mtrt_params* params, mtrt_on_token on_token, void* user,
                          mtrt_stats* stats, double* token_times) {
  return guarded([&] {
    if (!s) throw mtrt::Error("mtrt_session_generate: session must not be NULL");
    mtrt_model* m = s->model;
    std::vector<int64_t> prompt = s->ids;
    if (!s->messages.empty()) {
      mtrt::check_messages(s->messages);  // ends with a user message, roles alternate
      prompt = mtrt::format_chat(*m->tok, s->messages, m->manifest.chat_format, false, m->manifest.chat_template);
    }
    if (prompt.empty()) throw mtrt::Error("mtrt_session_generate: the session is empty; append a message or ids first");
    mtrt::Result r = run(m, prompt, params, on_token, user, stats, token_times, s->cache.get());
    if (!s->messages.empty())
      s->messages.push_back({{"role", "assistant"}, {"content", r.text}});
    else
      s->ids.insert(s->ids.end(), r.ids.begin(), r.ids.end());
  });
}

int mtrt_session_reset(mtrt_session* s) {
  return guarded([&] {
    if (!s) throw mtrt::Error("mtrt_session_reset: session must not be NULL");
    s->messages = mtrt::json::array();
    s->ids.clear();
    if (s->cache) s->cache->held.clear();
  });
}

void mtrt_session_close(mtrt_session* s) { delete s; }

}  // extern "C"
