// mistral-trt-cpp: the C++ runtime's command line, in the shapes of the Python CLI's `generate` and `tokenize`.
//
//   mistral-trt-cpp generate EXPORT_DIR (--prompt TEXT [--raw] | --messages CONV.json | --ids 1,2,3)
//                   [--max-new-tokens N] [--greedy | --temperature T [--top-p P] [--top-k K] [--seed S]]
//                   [--repetition-penalty R] [--stop STR ...] [--truncate] [--json]
//   mistral-trt-cpp tokenize (EXPORT_DIR | --tokenizer FILE) --messages CONV.json [--format mistral-v1]
//
// Bad input: one line on stderr naming what is wrong, exit code 2; never a crash.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "backend.hpp"
#include "generate.hpp"
#include "integrity.hpp"
#include "manifest.hpp"
#include "tokenizer.hpp"

using namespace mtrt;

namespace {

const char* kUsage =
    "usage: mistral-trt-cpp generate EXPORT_DIR (--prompt TEXT [--raw] | --messages CONV.json | --ids 1,2,3)\n"
    "                       [--max-new-tokens N] [--greedy | --temperature T [--top-p P] [--top-k K] [--seed S]]\n"
    "                       [--repetition-penalty R] [--stop STR ...] [--truncate] [--json]\n"
    "       mistral-trt-cpp tokenize (EXPORT_DIR | --tokenizer FILE) --messages CONV.json [--format mistral-v1]\n";

struct ArgError : Error {
  using Error::Error;
};

struct Args {
  std::string command, folder;
  std::map<std::string, std::vector<std::string>> values;  // --flag -> its values (repeatable ones: --stop)
  bool has(const std::string& f) const { return values.count(f) > 0; }
  const std::string& get(const std::string& f) const { return values.at(f).back(); }
};

const std::map<std::string, bool> kFlags = {  // flag -> takes a value
    {"--prompt", true}, {"--messages", true}, {"--ids", true}, {"--raw", false}, {"--max-new-tokens", true},
    {"--greedy", false}, {"--temperature", true}, {"--top-p", true}, {"--top-k", true}, {"--seed", true},
    {"--repetition-penalty", true}, {"--stop", true}, {"--truncate", false}, {"--json", false},
    {"--tokenizer", true}, {"--format", true}};

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) throw ArgError("the following arguments are required: command (generate or tokenize)");
  a.command = argv[1];
  if (a.command != "generate" && a.command != "tokenize")
    throw ArgError("argument command: invalid choice: '" + a.command + "' (choose from 'generate', 'tokenize')");
  for (int i = 2; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) == 0) {
      auto eq = s.find('=');
      std::string flag = s.substr(0, eq);
      auto it = kFlags.find(flag);
      if (it == kFlags.end()) throw ArgError("unrecognized arguments: " + s);
      if (!it->second) {
        a.values[flag].push_back("");
        continue;
      }
      if (eq != std::string::npos)
        a.values[flag].push_back(s.substr(eq + 1));
      else if (i + 1 < argc)
        a.values[flag].push_back(argv[++i]);
      else
        throw ArgError("argument " + flag + ": expected one argument");
      if (flag != "--stop" && a.values[flag].size() > 1) throw ArgError("argument " + flag + ": given twice");
    } else if (a.folder.empty()) {
      a.folder = s;
    } else {
      throw ArgError("unrecognized arguments: " + s);
    }
  }
  return a;
}

constexpr size_t kMaxStops = 16;  // runtime/request.py's MAX_STOPS

// Python's repr() of a float: the shortest text that reads back the same, with ".0" on a whole number.
std::string repr_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return py_repr(json(v));
}

// A number that does not parse is argparse's error; one out of range is runtime/request.py's: "FLAG VALUE: expected
// ...", the value as Python's repr shows it, so both runtimes give one message.
double number(const Args& a, const std::string& flag, const std::string& expected,
              bool (*ok)(double)) {
  const std::string& text = a.get(flag);
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end) throw ArgError("argument " + flag + ": expected a number, got '" + text + "'");
  if (!ok(v)) throw Error(flag + " " + repr_float(v) + ": expected " + expected);
  return v;
}

long long integer(const Args& a, const std::string& flag, long long low, const std::string& expected) {
  const std::string& text = a.get(flag);
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end || errno) throw ArgError("argument " + flag + ": expected an integer, got '" + text + "'");
  if (v < low) throw Error(flag + " " + std::to_string(v) + ": expected " + expected);
  return v;
}

std::vector<int64_t> ids_arg(const std::string& text) {
  std::vector<int64_t> ids;
  size_t i = 0;
  while (i <= text.size()) {
    size_t j = text.find(',', i);
    if (j == std::string::npos) j = text.size();
    std::string part = text.substr(i, j - i);
    if (!part.empty()) {
      char* end = nullptr;
      errno = 0;
      long long v = std::strtoll(part.c_str(), &end, 10);
      if (*end || errno) throw ArgError("argument --ids: expected comma-separated integers, got '" + text + "'");
      ids.push_back(v);
    }
    i = j + 1;
  }
  return ids;
}

Options options(const Args& a) {
  Options o;
  o.names = {"--max-new-tokens", "--truncate"};
  if (a.has("--max-new-tokens")) o.max_new_tokens = integer(a, "--max-new-tokens", 1, "an integer >= 1");
  Sampling& s = o.sampling;
  if (a.has("--temperature"))
    s.temperature = number(a, "--temperature", "a finite number >= 0 (0: greedy)",
                           [](double v) { return std::isfinite(v) && v >= 0; });
  if (a.has("--top-p"))
    s.top_p = number(a, "--top-p", "a number in (0, 1] (1: off)", [](double v) { return v > 0 && v <= 1; });
  if (a.has("--top-k")) s.top_k = integer(a, "--top-k", 0, "an integer >= 0 (0: off)");
  if (a.has("--repetition-penalty"))
    s.repetition_penalty = number(a, "--repetition-penalty", "a finite number > 0 (1: off)",
                                  [](double v) { return std::isfinite(v) && v > 0; });
  if (a.has("--seed")) {
    const std::string& t = a.get("--seed");
    char* end = nullptr;
    errno = 0;
    (void)std::strtoll(t.c_str(), &end, 10);
    bool integer_text = !t.empty() && !*end;  // an integer, of any size
    if (!integer_text && errno != ERANGE) throw ArgError("argument --seed: expected an integer, got '" + t + "'");
    errno = 0;
    unsigned long long v = std::strtoull(t.c_str(), &end, 10);
    if (errno || t[0] == '-') throw Error("--seed " + t + ": expected an integer in [0, 2**64)");
    s.seed = v;
  }
  if (a.has("--greedy") && s.temperature > 0)
    throw Error("--greedy and --temperature " + a.get("--temperature") + " contradict each other; give one");
  if (s.temperature == 0 && (s.top_p != 1.0 || s.top_k != 0))
    throw Error((s.top_p != 1.0 ? "--top-p " + repr_float(s.top_p) : "--top-k " + std::to_string(s.top_k)) +
                " applies to sampling: add --temperature T (T > 0); at temperature 0 decoding is greedy");
  if (a.has("--stop")) {
    const auto& stops = a.values.at("--stop");
    for (const auto& stop : stops)
      if (stop.empty() || stops.size() > kMaxStops)
        throw Error("--stop: expected a non-empty string or a list of 1 to " + std::to_string(kMaxStops) +
                    " of them (an empty stop string would stop at once)");
    for (const auto& stop : stops) {
      check_text(stop, "--stop");
      o.stop.push_back(stop);
    }
  }
  o.truncate = a.has("--truncate");
  return o;
}

double round_to(double v, int digits) {
  double f = std::pow(10.0, digits);
  return std::round(v * f) / f;
}

int cmd_generate(const Args& a) {
  if (a.folder.empty()) throw ArgError("the following arguments are required: EXPORT_DIR");
  int sources = a.has("--prompt") + a.has("--messages") + a.has("--ids");
  if (sources == 0) throw ArgError("one of the arguments --prompt --messages --ids is required");
  if (sources > 1) throw ArgError("--prompt, --messages and --ids: give one of them");
  if (a.has("--raw") && !a.has("--prompt"))
    throw Error("--raw goes with --prompt (a conversation has its chat format; --ids are ids already)");
  if (a.has("--prompt")) check_text(a.get("--prompt"), "--prompt");
  std::vector<int64_t> given = a.has("--ids") ? ids_arg(a.get("--ids")) : std::vector<int64_t>{};
  Options o = options(a);
  json messages;
  if (a.has("--messages")) {
    messages = read_json(a.get("--messages"));
    check_messages(messages);
  }
  Manifest m = Manifest::load(a.folder);
  auto backend = Backend::open(m);  // checks the files against the manifest's sha256
  std::optional<Tokenizer> tok;
  try {
    tok.emplace(Tokenizer::for_export(m));
  } catch (const Error& e) {
    if (!a.has("--ids") || std::string(e.what()).find("only byte-level BPE") == std::string::npos) throw;
  }
  std::vector<int64_t> prompt;
  if (a.has("--ids")) {
    int v = m.model.vocab_size;
    for (auto id : given)
      if (id < 0 || id >= v) throw Error("--ids: expected a non-empty list of token ids in [0, " + std::to_string(v) + ")");
    if (given.empty()) throw Error("--ids: expected a non-empty list of token ids in [0, " + std::to_string(v) + ")");
    prompt = given;
  } else if (a.has("--messages")) {
    prompt = format_chat(*tok, messages, m.chat_format, false, m.chat_template);  // a final "prefix": true is continued
  } else if (a.has("--raw")) {
    prompt = tok->encode(a.get("--prompt"), tok->add_bos);
  } else {
    prompt = format_chat(*tok, json::array({{{"role", "user"}, {"content", a.get("--prompt")}}}), m.chat_format, false,
                         m.chat_template);
  }
  Generator gen(*backend, tok ? &*tok : nullptr);
  bool stream = !a.has("--json");
  Result r = gen.generate(prompt, o, [&](int64_t, const std::string& piece) {
    if (stream && !piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  });
  if (!stream) {
    json out = {{"prompt_ids", prompt},
                {"ids", r.ids},
                {"text", tok ? json(r.text) : json(nullptr)},
                {"stats",
                 {{"prompt_tokens", r.stats.prompt_tokens},
                  {"new_tokens", r.stats.new_tokens},
                  {"time_to_first_token_s", round_to(r.stats.time_to_first_token_s, 4)},
                  {"decode_tokens_per_s", round_to(r.stats.decode_tokens_per_s(), 2)}}},
                {"stop_reason", r.stop_reason}};
    std::cout << py_dumps(out) << std::endl;
  } else {
    std::cout << std::endl;
    std::fprintf(stderr, "[%lld prompt tokens, %lld new, first token after %.0f ms, %.1f tokens/s]\n",
                 static_cast<long long>(r.stats.prompt_tokens), static_cast<long long>(r.stats.new_tokens),
                 r.stats.time_to_first_token_s * 1000, r.stats.decode_tokens_per_s());
  }
  return 0;
}

int cmd_tokenize(const Args& a) {
  if (a.folder.empty() == !a.has("--tokenizer"))
    throw Error("give an export folder EXPORT_DIR or --tokenizer FILE (one of them)");
  if (!a.has("--messages")) throw ArgError("the following arguments are required: --messages");
  if (a.has("--format") && a.get("--format") != "mistral-v1" && a.get("--format") != "template")
    throw ArgError("argument --format: invalid choice: '" + a.get("--format") + "' (choose from 'mistral-v1', 'template')");
  std::optional<Tokenizer> tok;
  std::string fmt, tmpl;
  if (!a.folder.empty()) {
    Manifest m = Manifest::load(a.folder);
    std::vector<std::pair<std::string, std::string>> files;
    for (const auto& [name, digest] : m.files)
      for (const auto& t : m.tokenizer_files)
        if (t == name) files.emplace_back(name, digest);
    check_files(m.folder, files, m.where);
    tok.emplace(Tokenizer::for_export(m));
    fmt = m.chat_format, tmpl = m.chat_template;
  } else {
    tok.emplace(Tokenizer::load(a.get("--tokenizer")));
    fmt = tok->kind == "sentencepiece" ? "mistral-v1" : "template";
    // the template beside the file, as the Python runtime looks for it: chat_template.jinja, else tokenizer_config.json's
    std::string file = a.get("--tokenizer"), dir = file.substr(0, file.find_last_of('/') == std::string::npos ? 0 : file.find_last_of('/'));
    if (is_file(join_path(dir, "chat_template.jinja"))) {
      tmpl = read_file(join_path(dir, "chat_template.jinja"));
    } else if (is_file(join_path(dir, "tokenizer_config.json"))) {
      json cfg = read_json(join_path(dir, "tokenizer_config.json"));
      if (cfg.is_object() && cfg.contains("chat_template") && cfg["chat_template"].is_string())
        tmpl = cfg["chat_template"].get<std::string>();
    }
  }
  if (a.has("--format")) fmt = a.get("--format");
  json messages = read_json(a.get("--messages"));
  auto ids = format_chat(*tok, messages, fmt, true, tmpl);  // a finished last reply: the training form
  json pieces = json::array();
  for (auto id : ids) pieces.push_back(tok->id_to_piece(id));
  std::cout << py_dumps(json{{"ids", ids}, {"pieces", pieces}}) << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string prog = "mistral-trt-cpp";
  if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::cout << kUsage;
    return 0;
  }
  if (argc >= 2 && std::string(argv[1]) != "--version") prog += std::string(" ") + argv[1];
  if (argc >= 2 && std::string(argv[1]) == "--version") {
    std::cout << "mistral-trt-cpp 0.1.0" << std::endl;
    return 0;
  }
  try {
    Args a = parse(argc, argv);
    return a.command == "generate" ? cmd_generate(a) : cmd_tokenize(a);
  } catch (const ArgError& e) {
    std::cerr << kUsage << prog << ": error: " << e.what() << std::endl;
    return 2;
  } catch (const Error& e) {
    std::cerr << prog << ": error: " << e.what() << std::endl;
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << prog << ": error: out of memory" << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << prog << ": internal error: " << e.what() << " (a bug: report it)" << std::endl;
    return 1;
  }
}
