#include "generate.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <set>

namespace mtrt {

namespace {

constexpr int kPrefillChunk = 512;
constexpr double kTruncateKeep = 0.5;  // truncation keeps at least this share of a prompt, or refuses

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string num(double v) { return py_dumps(json(v)); }

}  // namespace

void check_sampling(const Sampling& s) {
  auto finite = [](double v) { return std::isfinite(v); };
  if (!(finite(s.temperature) && s.temperature >= 0))
    throw Error("temperature " + num(s.temperature) + ": expected a finite number >= 0 (0: greedy)");
  if (!(finite(s.top_p) && s.top_p > 0 && s.top_p <= 1))
    throw Error("top_p " + num(s.top_p) + ": expected a number in (0, 1] (1: off)");
  if (s.top_k < 0) throw Error("top_k " + std::to_string(s.top_k) + ": expected an integer >= 0 (0: off)");
  if (!(finite(s.repetition_penalty) && s.repetition_penalty > 0))
    throw Error("repetition_penalty " + num(s.repetition_penalty) + ": expected a finite number > 0 (1: off)");
}

Generator::Generator(Backend& backend, const Tokenizer* tok) : backend_(backend), tok_(tok) {
  const Manifest& m = backend.manifest();
  max_context_ = m.max_context;
  // Chunks of at most W keep the trimmed cache small; without a window they only bound activation memory.
  chunk_ = std::min(kPrefillChunk, m.model.sliding_window.value_or(kPrefillChunk));
  eos_ = m.eos_token_id;
}

std::vector<int64_t> Generator::fit_context(std::vector<int64_t> p, const Options& o) const {
  const Names& n = o.names;
  if (o.max_new_tokens < 1)
    throw Error(n.max_new_tokens + " " + std::to_string(o.max_new_tokens) + ": expected an integer >= 1");
  if (o.max_new_tokens >= max_context_)
    throw Error(n.max_new_tokens + " " + std::to_string(o.max_new_tokens) + ": the context limit is " +
                std::to_string(max_context_) + " positions (prompt + new tokens); expected at most " +
                std::to_string(max_context_ - 1));
  int64_t room = max_context_ - o.max_new_tokens;
  if (p.empty()) throw Error("the prompt is empty");
  for (int64_t id : p)
    if (id < 0 || id >= backend_.manifest().model.vocab_size)
      throw Error("prompt ids must lie in [0, " + std::to_string(backend_.manifest().model.vocab_size) + "), got " +
                  std::to_string(id));
  int64_t len = static_cast<int64_t>(p.size());
  if (len > room) {
    std::string fits = "the prompt has " + std::to_string(len) + " tokens; with " + n.max_new_tokens + " " +
                       std::to_string(o.max_new_tokens) + " the context limit " + std::to_string(max_context_) +
                       " leaves room for " + std::to_string(room);
    if (!o.truncate) throw Error(fits + " (" + n.truncate + " keeps the last ones)");
    int64_t keep = static_cast<int64_t>(std::ceil(len * kTruncateKeep));
    if (room < keep && keep >= max_context_)  // no max_new_tokens helps: the half that must stay does not fit
      throw Error(fits + ": " + n.truncate + " keeps at least 50% of a prompt, and " + std::to_string(keep) +
                  " tokens do not fit the context limit at all: shorten the prompt");
    if (room < keep)
      throw Error(fits + ": " + n.truncate + " keeps at least 50% of a prompt, so ask for at most " +
                  std::to_string(max_context_ - keep) + " new tokens");
    p.erase(p.begin(), p.begin() + (len - room));
  }
  return p;
}

const float* Generator::prefill(const std::vector<int64_t>& prompt) {
  const float* logits = nullptr;
  for (size_t a = 0; a < prompt.size(); a += chunk_)
    logits = backend_.step(prompt.data() + a, static_cast<int>(std::min<size_t>(chunk_, prompt.size() - a)));
  return logits;
}

const float* Generator::decode_one_token(int64_t token) { return backend_.step(&token, 1); }

int64_t Generator::sample(const float* logits, const Sampling& s, const std::vector<int64_t>& seen) {
  const int v = backend_.manifest().model.vocab_size;
  std::vector<double> x(logits, logits + v);
  if (s.repetition_penalty != 1.0) {
    std::set<int64_t> ids(seen.begin(), seen.end());
    for (int64_t i : ids) x[i] = x[i] > 0 ? x[i] / s.repetition_penalty : x[i] * s.repetition_penalty;
  }
  if (s.temperature == 0) return std::max_element(x.begin(), x.end()) - x.begin();  // the first maximum, as argmax
  double top = *std::max_element(x.begin(), x.end());
  for (double& l : x) l = (l - top) / s.temperature;  // <= 0, the max at 0: never NaN
  if (s.top_k) {
    std::vector<double> sorted(x);
    int64_t k = std::min<int64_t>(s.top_k, v);
    std::nth_element(sorted.begin(), sorted.begin() + (v - k), sorted.end());
    double kth = sorted[v - k];
    for (double& l : x)
      if (l < kth) l = -INFINITY;
  }
  std::vector<double> p(v);
  double sum = 0;
  for (int i = 0; i < v; ++i) sum += (p[i] = std::exp(x[i]));
  for (double& q : p) q /= sum;
  if (s.top_p < 1.0) {  // the smallest set whose mass reaches top_p
    // Only tokens with p >= (1 - top_p) / 2v are sorted: the others hold less than (1 - top_p) / 2 together, so
    // these hold more than top_p and the set (a prefix of the descending order) lies within them. A stable sort of
    // them is the full stable sort's prefix, so the set and its sums are the same; sorting all 32k-49k ids took
    // milliseconds a token, where the set is usually a few dozen (runtime/generate.py's nucleus, the same rule).
    std::vector<int> order;
    double floor = (1.0 - s.top_p) / (2.0 * v), mass = 0;
    for (int i = 0; i < v; ++i)
      if (p[i] >= floor) order.push_back(i), mass += p[i];
    if (!(mass > s.top_p)) {  // only where rounding eats the margin (top_p within 1e-16 x v of 1)
      order.resize(v);
      std::iota(order.begin(), order.end(), 0);
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double cum = 0, kept = 0;
    std::vector<char> keep(v, 0);
    for (int i : order) {
      if (cum < s.top_p) keep[i] = 1, kept += p[i];
      cum += p[i];
    }
    for (int i = 0; i < v; ++i) p[i] = keep[i] ? p[i] / kept : 0;
  }
  double u = std::uniform_real_distribution<double>(0, 1)(rng_), cum = 0;
  for (int i = 0; i < v; ++i)
    if ((cum += p[i]) > u && p[i] > 0) return i;
  for (int i = v - 1; i >= 0; --i)
    if (p[i] > 0) return i;
  return 0;
}

Result Generator::generate(const std::vector<int64_t>& prompt_in, const Options& o,
                           const std::function<bool(int64_t, const std::string&)>& on_token, Cache* session) {
  check_sampling(o.sampling);
  for (const auto& s : o.stop) {
    if (s.empty()) throw Error("stop: expected non-empty strings (an empty stop string would stop at once)");
    check_text(s, "stop");
  }
  if (!o.stop.empty() && !tok_) throw Error("stop strings need the model's tokenizer to read the text");
  Result r;
  r.prompt = fit_context(prompt_in, o);
  rng_.seed(o.sampling.seed ? *o.sampling.seed : std::random_device{}());
  double t0 = now_s();
  struct Own {  // the backend's own cache comes back whatever happens below
    Backend& b;
    ~Own() { b.use(nullptr); }
  } own{backend_};
  const float* logits;
  if (session) {  // matched on ids, never on text
    size_t n = 0, limit = std::min(session->reusable(), r.prompt.size() - 1);
    while (n < limit && session->held[n] == r.prompt[n]) ++n;
    backend_.use(session);
    backend_.resume(n);
    r.stats.cached_tokens = static_cast<int64_t>(n);
    logits = prefill(std::vector<int64_t>(r.prompt.begin() + static_cast<std::ptrdiff_t>(n), r.prompt.end()));
  } else {
    int64_t window = backend_.manifest().keep ? *backend_.manifest().keep + chunk_ : 0;
    backend_.reset(static_cast<int>(window ? window : static_cast<int64_t>(r.prompt.size()) + o.max_new_tokens));
    logits = prefill(r.prompt);
  }
  return run_decode(std::move(r), logits, o, on_token, t0);
}

Result Generator::run_decode(Result r, const float* logits, const Options& o,
                             const std::function<bool(int64_t, const std::string&)>& on_token, double t0) {
  r.stats.prompt_tokens = static_cast<int64_t>(r.prompt.size());
  std::vector<int64_t> seen(r.prompt);
  std::optional<StreamDecoder> dec;
  if (tok_) dec.emplace(*tok_);
  size_t emitted = 0;  // bytes of r.text already handed to on_token
  auto held = [&](const std::string& text) {  // how much of text's end might begin a stop string
    size_t keep = 0;
    for (const auto& s : o.stop)
      for (size_t k = std::min(s.size() - 1, text.size()); k > keep; --k)
        if (text.compare(text.size() - k, k, s, 0, k) == 0) {
          keep = k;
          break;
        }
    return keep;
  };
  r.stop_reason = "length";
  for (int64_t n = 0; n < o.max_new_tokens; ++n) {
    int64_t t = sample(logits, o.sampling, seen);
    double now = now_s();
    r.stats.new_tokens += 1;
    r.token_times.push_back(now - t0);
    if (n == 0)
      r.stats.time_to_first_token_s = now - t0;
    else
      r.stats.decode_s = now - t0 - r.stats.time_to_first_token_s;
    if (!o.ignore_eos && std::find(eos_.begin(), eos_.end(), t) != eos_.end()) {
      r.stop_reason = "eos";
      break;
    }
    r.ids.push_back(t);
    seen.push_back(t);
    std::string piece = dec ? dec->push(t) : "";
    bool last = n == o.max_new_tokens - 1;
    if (last && dec) piece += dec->flush();
    r.text += piece;
    size_t found = std::string::npos;
    for (const auto& s : o.stop) found = std::min(found, r.text.find(s));
    if (found != std::string::npos) {
      r.text.resize(found);
      r.stop_reason = "stop";
    }
    size_t upto = r.stop_reason == "stop" || last ? r.text.size() : r.text.size() - held(r.text);
    std::string out = upto > emitted ? r.text.substr(emitted, upto - emitted) : "";
    emitted = std::max(emitted, upto);
    if (on_token && !on_token(t, out) && r.stop_reason == "length") {
      r.stop_reason = "callback";
      break;
    }
    if (r.stop_reason == "stop" || last) break;
    logits = decode_one_token(t);
  }
  if (on_token && emitted < r.text.size()) on_token(-1, r.text.substr(emitted));  // held back, and then EOS came
  return r;
}

}  // namespace mtrt
