#include "jinja.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <vector>

namespace mtrt::jinja {

namespace {

[[noreturn]] void fail(const std::string& why) { throw Error("chat template: " + why); }

json undefined() { return json(json::value_t::discarded); }
bool is_undef(const json& v) { return v.is_discarded(); }

bool truthy(const json& v) {
  if (is_undef(v) || v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number_integer()) return v.get<int64_t>() != 0;
  if (v.is_number()) return v.get<double>() != 0;
  if (v.is_string()) return !v.get<std::string>().empty();
  return !v.empty();  // list, dict
}

std::string str(const json& v);

std::string repr(const json& v) {  // Python's repr, for lists and dicts printed as text
  if (v.is_string()) return py_repr(v);
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + repr(v[i]);
    return out + "]";
  }
  if (v.is_object()) {
    std::string out = "{";
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it, first = false) out += (first ? "" : ", ") + py_repr(it.key()) + ": " + repr(*it);
    return out + "}";
  }
  return str(v);
}

std::string str(const json& v) {  // Python's str()
  if (is_undef(v)) return "";
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_number()) return py_repr(v);
  return repr(v);
}

// -- the template's pieces -------------------------------------------------------------------------------------
struct Piece {
  enum Kind { kText, kOutput, kStatement } kind;
  std::string body;
};

bool space_or_tab(char c) { return c == ' ' || c == '\t'; }
bool space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Text, {{ ... }} and {% ... %} pieces, with jinja2's whitespace rules: `-` strips all whitespace on its side;
// lstrip_blocks strips spaces and tabs from a line's start up to a block or comment tag (unless `+`); trim_blocks
// drops the first newline after one.
std::vector<Piece> lex(const std::string& s) {
  std::vector<Piece> out;
  std::string text;
  bool trim_next_newline = false, strip_next = false;
  size_t i = 0;
  auto flush_text = [&] {
    if (!text.empty()) out.push_back({Piece::kText, text});
    text.clear();
  };
  while (i < s.size()) {
    if (strip_next) {
      while (i < s.size() && space(s[i])) ++i;
      strip_next = false;
      continue;
    }
    if (trim_next_newline) {
      trim_next_newline = false;
      if (s.compare(i, 2, "\r\n") == 0) {
        i += 2;
        continue;
      }
      if (s[i] == '\n') {
        ++i;
        continue;
      }
    }
    if (s[i] != '{' || i + 1 >= s.size() || (s[i + 1] != '{' && s[i + 1] != '%' && s[i + 1] != '#')) {
      text += s[i++];
      continue;
    }
    char open = s[i + 1];
    std::string close = open == '{' ? "}}" : open == '%' ? "%}" : "#}";
    size_t start = i + 2;
    bool minus_left = start < s.size() && s[start] == '-', plus_left = start < s.size() && s[start] == '+';
    if (minus_left || plus_left) ++start;
    if (minus_left) {
      while (!text.empty() && space(text.back())) text.pop_back();
    } else if (open != '{' && !plus_left) {  // lstrip_blocks: the blanks between the source line's start and the tag
      size_t b = 0;
      while (b < i && space_or_tab(s[i - 1 - b])) ++b;
      if (b == i || s[i - 1 - b] == '\n') {
        size_t k = text.size(), n = 0;
        while (k > 0 && n < b && space_or_tab(text[k - 1])) --k, ++n;
        text.resize(k);
      }
    }
    size_t end = s.find(close, start);
    if (end == std::string::npos) fail("a tag opened with '{" + std::string(1, open) + "' is never closed");
    bool minus_right = end > start && s[end - 1] == '-';
    std::string body = s.substr(start, end - start - (minus_right ? 1 : 0));
    flush_text();
    if (open == '{') out.push_back({Piece::kOutput, body});
    else if (open == '%') out.push_back({Piece::kStatement, body});
    i = end + 2;
    if (minus_right) strip_next = true;
    else if (open != '{') trim_next_newline = true;
  }
  flush_text();
  return out;
}

// -- expressions ----------------------------------------------------------------------------------------------
struct Tok {
  enum Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind;
  std::string text;
};

std::vector<Tok> tokenize(const std::string& s) {
  std::vector<Tok> out;
  size_t i = 0;
  while (i < s.size()) {
    char c = s[i];
    if (space(c)) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Tok::kName, s.substr(i, j - i)});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      bool real = j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]));
      if (real) {
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      out.push_back({real ? Tok::kFloat : Tok::kInt, s.substr(i, j - i)});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          char e = s[++j];
          v += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;  // \\ \' \" and the rest as themselves
        } else {
          v += s[j];
        }
      }
      if (j >= s.size()) fail("a string is never closed");
      out.push_back({Tok::kString, v});
      i = j + 1;
    } else {
      static const char* ops[] = {"//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "(", ")",
                                  "[", "]", "{", "}", ",", ".", ":", "|", "="};
      const char* hit = nullptr;
      for (const char* op : ops)
        if (s.compare(i, std::strlen(op), op) == 0) {
          hit = op;
          break;
        }
      if (!hit) fail(std::string("unexpected character '") + c + "'");
      out.push_back({Tok::kOp, hit});
      i += std::strlen(hit);
    }
  }
  out.push_back({Tok::kEnd, ""});
  return out;
}

struct Scope;
struct Expr {
  virtual ~Expr() = default;
  virtual json eval(Scope& sc) const = 0;
};
using ExprP = std::unique_ptr<Expr>;

struct LoopControl {
  bool is_break;
};

struct Scope {
  std::vector<std::map<std::string, json>> frames;
  json get(const std::string& name) const {
    for (auto it = frames.rbegin(); it != frames.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return undefined();
  }
  json* find(const std::string& name) {
    for (auto it = frames.rbegin(); it != frames.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return &f->second;
    }
    return nullptr;
  }
};

template <typename F>
struct Fn : Expr {
  F f;
  explicit Fn(F f) : f(std::move(f)) {}
  json eval(Scope& sc) const override { return f(sc); }
};
template <typename F>
ExprP fn(F f) {
  return std::make_unique<Fn<F>>(std::move(f));
}

int64_t as_int(const json& v, const std::string& what) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_boolean()) return v.get<bool>();
  fail(what + ": expected an integer, got " + repr(v));
}

bool equal(const json& a, const json& b) {
  if (a.is_number() && b.is_number()) return a.get<double>() == b.get<double>();
  if (is_undef(a) || is_undef(b)) return is_undef(a) && is_undef(b);
  return a == b;
}

json index(const json& obj, const json& key) {
  if (obj.is_object()) {
    if (!key.is_string()) return undefined();
    auto it = obj.find(key.get<std::string>());
    return it == obj.end() ? undefined() : *it;
  }
  if (obj.is_array() || obj.is_string()) {
    if (!key.is_number_integer()) return undefined();
    int64_t n = obj.is_array() ? static_cast<int64_t>(obj.size()) : static_cast<int64_t>(obj.get<std::string>().size());
    int64_t k = key.get<int64_t>();
    if (k < 0) k += n;
    if (k < 0 || k >= n) return undefined();
    return obj.is_array() ? obj[static_cast<size_t>(k)] : json(obj.get<std::string>().substr(static_cast<size_t>(k), 1));
  }
  return undefined();
}

json slice(const json& obj, const json& a, const json& b, const json& step) {
  if (!obj.is_array() && !obj.is_string()) fail("only lists and strings can be sliced");
  int64_t n = obj.is_array() ? static_cast<int64_t>(obj.size()) : static_cast<int64_t>(obj.get<std::string>().size());
  int64_t st = step.is_null() ? 1 : as_int(step, "a slice's step");
  if (st == 0) fail("a slice's step cannot be zero");
  auto bound = [&](const json& v, int64_t dflt) {
    if (v.is_null()) return dflt;
    int64_t k = as_int(v, "a slice's bound");
    if (k < 0) k += n;
    return st > 0 ? std::clamp<int64_t>(k, 0, n) : std::clamp<int64_t>(k, -1, n - 1);
  };
  int64_t lo = bound(a, st > 0 ? 0 : n - 1), hi = bound(b, st > 0 ? n : -1);
  json out = obj.is_array() ? json::array() : json("");
  std::string s;
  for (int64_t k = lo; st > 0 ? k < hi : k > hi; k += st) {
    if (obj.is_array()) out.push_back(obj[static_cast<size_t>(k)]);
    else s += obj.get<std::string>()[static_cast<size_t>(k)];
  }
  return obj.is_array() ? out : json(s);
}

std::string strip(const std::string& s, const std::string& chars, bool left, bool right) {
  auto in = [&](char c) { return chars.empty() ? space(c) : chars.find(c) != std::string::npos; };
  size_t a = 0, b = s.size();
  if (left) while (a < b && in(s[a])) ++a;
  if (right) while (b > a && in(s[b - 1])) --b;
  return s.substr(a, b - a);
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

std::string upper(std::string s, bool up) {  // ASCII letters (what chat templates case-change: role names)
  for (char& c : s) c = static_cast<char>(up ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
  return s;
}

size_t utf8_chars(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

json length(const json& v) {
  if (v.is_string()) return static_cast<int64_t>(utf8_chars(v.get<std::string>()));
  if (v.is_array() || v.is_object()) return static_cast<int64_t>(v.size());
  fail("length of " + repr(v));
}

json method(const json& obj, const std::string& name, const std::vector<json>& args) {
  auto arg = [&](size_t k) { return k < args.size() ? args[k] : json(); };
  if (obj.is_string()) {
    const std::string s = obj.get<std::string>();
    std::string chars = arg(0).is_string() ? arg(0).get<std::string>() : "";
    if (name == "strip") return strip(s, chars, true, true);
    if (name == "lstrip") return strip(s, chars, true, false);
    if (name == "rstrip") return strip(s, chars, false, true);
    if (name == "upper") return upper(s, true);
    if (name == "lower") return upper(s, false);
    if (name == "startswith" && arg(0).is_string()) return s.rfind(arg(0).get<std::string>(), 0) == 0;
    if (name == "endswith" && arg(0).is_string()) {
      std::string t = arg(0).get<std::string>();
      return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
    }
    if (name == "replace" && arg(0).is_string() && arg(1).is_string())
      return replace_all(s, arg(0).get<std::string>(), arg(1).get<std::string>());
    if (name == "split") {
      json out = json::array();
      if (arg(0).is_string() && !arg(0).get<std::string>().empty()) {
        std::string sep = arg(0).get<std::string>();
        size_t a = 0;
        for (size_t p = s.find(sep); p != std::string::npos; a = p + sep.size(), p = s.find(sep, a)) out.push_back(s.substr(a, p - a));
        out.push_back(s.substr(a));
      } else {
        size_t a = 0;
        while (true) {
          while (a < s.size() && space(s[a])) ++a;
          if (a >= s.size()) break;
          size_t b = a;
          while (b < s.size() && !space(s[b])) ++b;
          out.push_back(s.substr(a, b - a));
          a = b;
        }
      }
      return out;
    }
  }
  if (obj.is_object()) {
    if (name == "get") {
      json v = index(obj, arg(0));
      return is_undef(v) ? (args.size() > 1 ? args[1] : json()) : v;
    }
    if (name == "items" || name == "keys" || name == "values") {
      json out = json::array();
      for (auto it = obj.begin(); it != obj.end(); ++it)
        out.push_back(name == "items" ? json::array({it.key(), *it}) : name == "keys" ? json(it.key()) : *it);
      return out;
    }
  }
  fail("no method " + name + "() on " + repr(obj));
}

class Parser {
 public:
  explicit Parser(const std::string& s) : t_(tokenize(s)) {}

  ExprP expression() { return ternary(); }
  bool at_end() const { return t_[p_].kind == Tok::kEnd; }
  bool peek_name(const char* n) const { return t_[p_].kind == Tok::kName && t_[p_].text == n; }
  bool peek_op(const char* o) const { return t_[p_].kind == Tok::kOp && t_[p_].text == o; }
  std::string name() {
    if (t_[p_].kind != Tok::kName) fail("expected a name, got '" + t_[p_].text + "'");
    return t_[p_++].text;
  }
  void expect_op(const char* o) {
    if (!peek_op(o)) fail(std::string("expected '") + o + "', got '" + t_[p_].text + "'");
    ++p_;
  }
  void expect_name(const char* n) {
    if (!peek_name(n)) fail(std::string("expected '") + n + "', got '" + t_[p_].text + "'");
    ++p_;
  }
  void end() {
    if (!at_end()) fail("unexpected '" + t_[p_].text + "'");
  }
  bool accept_name(const char* n) {
    if (!peek_name(n)) return false;
    ++p_;
    return true;
  }
  bool accept_op(const char* o) {
    if (!peek_op(o)) return false;
    ++p_;
    return true;
  }

  ExprP ternary() {
    ExprP a = or_();
    if (!peek_name("if")) return a;
    ++p_;
    ExprP cond = or_();
    ExprP b = accept_name("else") ? ternary() : nullptr;
    return fn([a = std::shared_ptr<Expr>(std::move(a)), cond = std::shared_ptr<Expr>(std::move(cond)),
               b = std::shared_ptr<Expr>(std::move(b))](Scope& sc) {
      return truthy(cond->eval(sc)) ? a->eval(sc) : b ? b->eval(sc) : undefined();
    });
  }
  // the condition of a for loop's `if`: no ternary there
  ExprP condition() { return or_(); }

 private:
  using S = std::shared_ptr<Expr>;
  ExprP or_() {
    ExprP a = and_();
    while (accept_name("or")) {
      S l(std::move(a)), r(and_());
      a = fn([l, r](Scope& sc) { json v = l->eval(sc); return truthy(v) ? v : r->eval(sc); });
    }
    return a;
  }
  ExprP and_() {
    ExprP a = not_();
    while (accept_name("and")) {
      S l(std::move(a)), r(not_());
      a = fn([l, r](Scope& sc) { json v = l->eval(sc); return !truthy(v) ? v : r->eval(sc); });
    }
    return a;
  }
  ExprP not_() {
    if (accept_name("not")) {
      S e(not_());
      return fn([e](Scope& sc) { return json(!truthy(e->eval(sc))); });
    }
    return compare();
  }
  ExprP compare() {
    ExprP a = concat();
    while (true) {
      std::string op;
      if (peek_op("==") || peek_op("!=") || peek_op("<") || peek_op(">") || peek_op("<=") || peek_op(">=")) {
        op = t_[p_++].text;
      } else if (peek_name("in")) {
        ++p_, op = "in";
      } else if (peek_name("not") && t_[p_ + 1].kind == Tok::kName && t_[p_ + 1].text == "in") {
        p_ += 2, op = "not in";
      } else if (accept_name("is")) {
        bool negate = accept_name("not");
        std::string test = name();
        S e(std::move(a));
        a = fn([e, test, negate](Scope& sc) { return json(is_test(e->eval(sc), test) != negate); });
        continue;
      } else {
        return a;
      }
      S l(std::move(a)), r(concat());
      a = fn([l, r, op](Scope& sc) {
        json x = l->eval(sc), y = r->eval(sc);
        if (op == "==") return json(equal(x, y));
        if (op == "!=") return json(!equal(x, y));
        if (op == "in" || op == "not in") {
          bool in = false;
          if (y.is_string() && x.is_string()) in = y.get<std::string>().find(x.get<std::string>()) != std::string::npos;
          else if (y.is_array()) in = std::any_of(y.begin(), y.end(), [&](const json& e) { return equal(e, x); });
          else if (y.is_object()) in = x.is_string() && y.contains(x.get<std::string>());
          else if (!is_undef(y)) fail("'in' needs a string, list or dict, got " + repr(y));
          return json(op == "in" ? in : !in);
        }
        if (x.is_number() && y.is_number()) {
          double a = x.get<double>(), b = y.get<double>();
          return json(op == "<" ? a < b : op == ">" ? a > b : op == "<=" ? a <= b : a >= b);
        }
        if (x.is_string() && y.is_string()) {
          auto a = x.get<std::string>(), b = y.get<std::string>();
          return json(op == "<" ? a < b : op == ">" ? a > b : op == "<=" ? a <= b : a >= b);
        }
        fail("cannot compare " + repr(x) + " " + op + " " + repr(y));
      });
    }
  }
  static bool is_test(const json& v, const std::string& t) {
    if (t == "defined") return !is_undef(v);
    if (t == "undefined") return is_undef(v);
    if (t == "none") return v.is_null();
    if (t == "string") return v.is_string();
    if (t == "number") return v.is_number();
    if (t == "integer") return v.is_number_integer();
    if (t == "float") return v.is_number_float();
    if (t == "boolean") return v.is_boolean();
    if (t == "true") return v.is_boolean() && v.get<bool>();
    if (t == "false") return v.is_boolean() && !v.get<bool>();
    if (t == "mapping") return v.is_object();
    if (t == "iterable") return v.is_array() || v.is_object() || v.is_string();
    if (t == "sequence") return v.is_array() || v.is_string() || v.is_object();
    if (t == "even" || t == "odd") return v.is_number_integer() && (v.get<int64_t>() % 2 == 0) == (t == "even");
    fail("unknown test '" + t + "'");
  }
  ExprP concat() {
    ExprP a = additive();
    while (accept_op("~")) {
      S l(std::move(a)), r(additive());
      a = fn([l, r](Scope& sc) { return json(str(l->eval(sc)) + str(r->eval(sc))); });
    }
    return a;
  }
  ExprP additive() {
    ExprP a = multiplicative();
    while (peek_op("+") || peek_op("-")) {
      std::string op = t_[p_++].text;
      S l(std::move(a)), r(multiplicative());
      a = fn([l, r, op](Scope& sc) { return arith(l->eval(sc), r->eval(sc), op); });
    }
    return a;
  }
  ExprP multiplicative() {
    ExprP a = unary();
    while (peek_op("*") || peek_op("/") || peek_op("//") || peek_op("%")) {
      std::string op = t_[p_++].text;
      S l(std::move(a)), r(unary());
      a = fn([l, r, op](Scope& sc) { return arith(l->eval(sc), r->eval(sc), op); });
    }
    return a;
  }
  static json arith(const json& x, const json& y, const std::string& op) {
    if (op == "+" && x.is_string() && y.is_string()) return x.get<std::string>() + y.get<std::string>();
    if (op == "+" && x.is_array() && y.is_array()) {
      json out = x;
      for (const auto& e : y) out.push_back(e);
      return out;
    }
    if (op == "*" && x.is_string() && y.is_number_integer()) {
      std::string out;
      for (int64_t k = 0; k < y.get<int64_t>(); ++k) out += x.get<std::string>();
      return out;
    }
    if (!x.is_number() || !y.is_number())
      fail("cannot compute " + repr(x) + " " + op + " " + repr(y) + (is_undef(x) || is_undef(y) ? " (undefined)" : ""));
    bool ints = x.is_number_integer() && y.is_number_integer();
    if (ints && op != "/") {
      int64_t a = x.get<int64_t>(), b = y.get<int64_t>();
      if ((op == "//" || op == "%") && b == 0) fail("division by zero");
      if (op == "+") return a + b;
      if (op == "-") return a - b;
      if (op == "*") return a * b;
      int64_t q = a / b - ((a % b != 0) && ((a < 0) != (b < 0)));  // Python's floor division
      return op == "//" ? json(q) : json(a - q * b);
    }
    double a = x.get<double>(), b = y.get<double>();
    if ((op == "/" || op == "//" || op == "%") && b == 0) fail("division by zero");
    if (op == "+") return a + b;
    if (op == "-") return a - b;
    if (op == "*") return a * b;
    if (op == "/") return a / b;
    if (op == "//") return std::floor(a / b);
    return a - std::floor(a / b) * b;
  }
  ExprP unary() {
    if (accept_op("-")) {
      S e(unary());
      return fn([e](Scope& sc) { return arith(json(0), e->eval(sc), "-"); });
    }
    return postfix(primary());
  }
  // after '(' up to and with ')'; keyword arguments only where `kwargs` takes them (namespace(found=false))
  std::vector<S> call_args(std::vector<std::pair<std::string, S>>* kwargs = nullptr) {
    std::vector<S> args;
    while (!accept_op(")")) {
      if (t_[p_].kind == Tok::kName && t_[p_ + 1].kind == Tok::kOp && t_[p_ + 1].text == "=") {
        if (!kwargs) fail("keyword arguments are not supported here (" + t_[p_].text + "=)");
        std::string k = t_[p_].text;
        p_ += 2;
        kwargs->emplace_back(k, S(expression()));
      } else {
        args.emplace_back(expression());
      }
      if (!peek_op(")")) expect_op(",");
    }
    return args;
  }
  ExprP postfix(ExprP a) {
    while (true) {
      if (accept_op(".")) {
        std::string attr = name();
        S obj(std::move(a));
        if (accept_op("(")) {
          auto args = call_args();
          a = fn([obj, attr, args](Scope& sc) {
            std::vector<json> vs;
            for (const auto& x : args) vs.push_back(x->eval(sc));
            return method(obj->eval(sc), attr, vs);
          });
        } else {
          a = fn([obj, attr](Scope& sc) { return index(obj->eval(sc), json(attr)); });
        }
      } else if (accept_op("[")) {
        S obj(std::move(a)), lo, hi, step;
        bool is_slice = false;
        if (!peek_op(":")) lo = S(expression());
        if (accept_op(":")) {
          is_slice = true;
          if (!peek_op("]") && !peek_op(":")) hi = S(expression());
          if (accept_op(":") && !peek_op("]")) step = S(expression());
        }
        expect_op("]");
        if (is_slice) {
          a = fn([obj, lo, hi, step](Scope& sc) {
            auto ev = [&](const S& e) { return e ? e->eval(sc) : json(); };
            return slice(obj->eval(sc), ev(lo), ev(hi), ev(step));
          });
        } else {
          a = fn([obj, lo](Scope& sc) { return index(obj->eval(sc), lo->eval(sc)); });
        }
      } else if (accept_op("|")) {
        std::string filter = name();
        std::vector<S> args;
        if (accept_op("(")) args = call_args();
        S obj(std::move(a));
        a = fn([obj, filter, args](Scope& sc) {
          std::vector<json> vs;
          for (const auto& x : args) vs.push_back(x->eval(sc));
          return apply_filter(obj->eval(sc), filter, vs);
        });
      } else {
        return a;
      }
    }
  }
  static json apply_filter(const json& v, const std::string& f, const std::vector<json>& args) {
    auto arg = [&](size_t k) { return k < args.size() ? args[k] : json(); };
    if (f == "trim") return strip(str(v), arg(0).is_string() ? arg(0).get<std::string>() : "", true, true);
    if (f == "length" || f == "count") return length(v);
    if (f == "upper" || f == "lower") return upper(str(v), f == "upper");
    if (f == "capitalize") {
      std::string s = upper(str(v), false);
      if (!s.empty()) s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
      return s;
    }
    if (f == "title") {
      std::string s = str(v);
      bool start = true;
      for (char& c : s) {
        bool alpha = std::isalpha(static_cast<unsigned char>(c));
        c = static_cast<char>(alpha ? (start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c))) : c);
        start = !alpha;
      }
      return s;
    }
    if (f == "string") return str(v);
    if (f == "safe") return v;
    if (f == "int") return v.is_number() ? json(static_cast<int64_t>(v.get<double>())) : json(int64_t{0});
    if (f == "tojson") {
      if (!args.empty() && !arg(0).is_null()) fail("tojson(indent) is not supported");
      return py_dumps(v);
    }
    if (f == "first" || f == "last") {
      if (v.is_array()) return v.empty() ? undefined() : f == "first" ? v.front() : v.back();
      if (v.is_string()) return index(v, json(f == "first" ? 0 : -1));
    }
    if (f == "list") {
      if (v.is_array()) return v;
      if (v.is_string()) {
        json out = json::array();
        for (char c : v.get<std::string>()) out.push_back(std::string(1, c));
        return out;
      }
    }
    if (f == "reverse" && v.is_array()) {
      json out = json::array();
      for (auto it = v.rbegin(); it != v.rend(); ++it) out.push_back(*it);
      return out;
    }
    if (f == "reverse" && v.is_string()) {
      std::string s = v.get<std::string>();
      return std::string(s.rbegin(), s.rend());
    }
    if (f == "join" && v.is_array()) {
      std::string sep = arg(0).is_string() ? arg(0).get<std::string>() : "", out;
      for (size_t k = 0; k < v.size(); ++k) out += (k ? sep : "") + str(v[k]);
      return out;
    }
    if (f == "default" || f == "d") {
      bool use = is_undef(v) || (truthy(arg(1)) && !truthy(v));
      return use ? arg(0) : v;
    }
    if (f == "replace" && arg(0).is_string() && arg(1).is_string())
      return replace_all(str(v), arg(0).get<std::string>(), arg(1).get<std::string>());
    if (f == "items" && v.is_object()) return method(v, "items", {});
    fail("unsupported filter '" + f + "' on " + repr(v));
  }
  ExprP primary() {
    const Tok t = t_[p_++];
    switch (t.kind) {
      case Tok::kString: {
        std::string s = t.text;
        while (t_[p_].kind == Tok::kString) s += t_[p_++].text;  // adjacent literals join, as in Python
        return fn([s](Scope&) { return json(s); });
      }
      case Tok::kInt: {
        int64_t v = std::stoll(t.text);
        return fn([v](Scope&) { return json(v); });
      }
      case Tok::kFloat: {
        double v = std::stod(t.text);
        return fn([v](Scope&) { return json(v); });
      }
      case Tok::kName: {
        if (t.text == "true" || t.text == "True") return fn([](Scope&) { return json(true); });
        if (t.text == "false" || t.text == "False") return fn([](Scope&) { return json(false); });
        if (t.text == "none" || t.text == "None") return fn([](Scope&) { return json(); });
        std::string n = t.text;
        if (accept_op("(")) {
          std::vector<std::pair<std::string, S>> kwargs;
          auto args = call_args(n == "namespace" ? &kwargs : nullptr);
          if (n == "namespace") {
            if (!args.empty()) fail("namespace() takes keyword arguments only");
            return fn([kwargs](Scope& sc) {
              json ns = json::object({{"__namespace__", true}});
              for (const auto& [k, v] : kwargs) ns[k] = v->eval(sc);
              return ns;
            });
          }
          return call(n, std::move(args));
        }
        return fn([n](Scope& sc) { return sc.get(n); });
      }
      case Tok::kOp:
        if (t.text == "(") {
          ExprP e = expression();
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          std::vector<S> items;
          while (!accept_op("]")) {
            items.emplace_back(expression());
            if (!peek_op("]")) expect_op(",");
          }
          return fn([items](Scope& sc) {
            json out = json::array();
            for (const auto& e : items) out.push_back(e->eval(sc));
            return out;
          });
        }
        if (t.text == "{") {
          std::vector<std::pair<S, S>> items;
          while (!accept_op("}")) {
            S k(expression());
            expect_op(":");
            items.emplace_back(k, S(expression()));
            if (!peek_op("}")) expect_op(",");
          }
          return fn([items](Scope& sc) {
            json out = json::object();
            for (const auto& [k, v] : items) out[str(k->eval(sc))] = v->eval(sc);
            return out;
          });
        }
        break;
      case Tok::kEnd:
        fail("the expression ends too early");
    }
    fail("unexpected '" + t.text + "'");
  }
  ExprP call(const std::string& n, std::vector<S> args) {
    if (n == "raise_exception") {
      return fn([args](Scope& sc) -> json {
        fail(args.empty() ? std::string("raise_exception()") : str(args[0]->eval(sc)));
      });
    }
    if (n == "range") {
      return fn([args](Scope& sc) {
        std::vector<int64_t> v;
        for (const auto& a : args) v.push_back(as_int(a->eval(sc), "range()"));
        int64_t lo = v.size() > 1 ? v[0] : 0, hi = v.size() > 1 ? v[1] : v.empty() ? 0 : v[0],
                st = v.size() > 2 ? v[2] : 1;
        if (st == 0) fail("range() step cannot be zero");
        json out = json::array();
        for (int64_t k = lo; st > 0 ? k < hi : k > hi; k += st) out.push_back(k);
        return out;
      });
    }
    fail("unknown function " + n + "()");
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
};

// -- statements -------------------------------------------------------------------------------------------------
struct Node {
  virtual ~Node() = default;
  virtual void run(Scope& sc, std::string& out) const = 0;
};
using NodeP = std::unique_ptr<Node>;
using Body = std::vector<NodeP>;

void run_body(const Body& body, Scope& sc, std::string& out) {
  for (const auto& n : body) n->run(sc, out);
}

struct TextNode : Node {
  std::string text;
  void run(Scope&, std::string& out) const override { out += text; }
};
struct OutputNode : Node {
  ExprP e;
  void run(Scope& sc, std::string& out) const override { out += str(e->eval(sc)); }
};
struct IfNode : Node {
  std::vector<std::pair<ExprP, Body>> branches;  // a null condition: else
  void run(Scope& sc, std::string& out) const override {
    for (const auto& [cond, body] : branches)
      if (!cond || truthy(cond->eval(sc))) {
        run_body(body, sc, out);
        return;
      }
  }
};
struct SetNode : Node {
  std::string name, attr;  // attr: set ns.attr
  ExprP e;
  void run(Scope& sc, std::string&) const override {
    json v = e->eval(sc);
    if (attr.empty()) {
      sc.frames.back()[name] = v;
      return;
    }
    json* ns = sc.find(name);
    if (!ns || !ns->is_object() || !ns->contains("__namespace__")) fail("set " + name + "." + attr + ": not a namespace()");
    (*ns)[attr] = v;
  }
};
struct ControlNode : Node {
  bool is_break;
  void run(Scope&, std::string&) const override { throw LoopControl{is_break}; }
};
struct ForNode : Node {
  std::vector<std::string> targets;
  ExprP iter, filter;
  Body body, else_body;
  void run(Scope& sc, std::string& out) const override {
    json seq = iter->eval(sc);
    json items = json::array();
    if (seq.is_array()) items = seq;
    else if (seq.is_object()) for (auto it = seq.begin(); it != seq.end(); ++it) items.push_back(it.key());
    else if (seq.is_string()) for (char c : seq.get<std::string>()) items.push_back(std::string(1, c));
    else if (!is_undef(seq) && !seq.is_null()) fail("for: cannot iterate over " + repr(seq));
    auto bind = [&](std::map<std::string, json>& f, const json& item) {
      if (targets.size() == 1) {
        f[targets[0]] = item;
        return;
      }
      if (!item.is_array() || item.size() != targets.size()) fail("for: cannot unpack " + repr(item));
      for (size_t k = 0; k < targets.size(); ++k) f[targets[k]] = item[k];
    };
    if (filter) {  // the loop's `if`: the loop variables count only the items that pass
      json kept = json::array();
      for (const auto& item : items) {
        sc.frames.emplace_back();
        bind(sc.frames.back(), item);
        bool pass = truthy(filter->eval(sc));
        sc.frames.pop_back();
        if (pass) kept.push_back(item);
      }
      items = kept;
    }
    const size_t n = items.size();
    for (size_t k = 0; k < n; ++k) {
      sc.frames.emplace_back();
      auto& f = sc.frames.back();
      bind(f, items[k]);
      f["loop"] = json{{"index", k + 1}, {"index0", k}, {"first", k == 0}, {"last", k + 1 == n}, {"length", n},
                       {"revindex", n - k}, {"revindex0", n - k - 1},
                       {"previtem", k ? items[k - 1] : undefined()}, {"nextitem", k + 1 < n ? items[k + 1] : undefined()}};
      try {
        run_body(body, sc, out);
      } catch (const LoopControl& c) {
        sc.frames.pop_back();
        if (c.is_break) return;
        continue;
      }
      sc.frames.pop_back();
    }
    if (n == 0) run_body(else_body, sc, out);
  }
};

class Builder {
 public:
  explicit Builder(const std::vector<Piece>& pieces) : ps_(pieces) {}

  Body parse(const std::vector<std::string>& stop, std::string* stopped_at) {
    Body body;
    while (i_ < ps_.size()) {
      const Piece& p = ps_[i_++];
      if (p.kind == Piece::kText) {
        auto n = std::make_unique<TextNode>();
        n->text = p.body;
        body.push_back(std::move(n));
        continue;
      }
      if (p.kind == Piece::kOutput) {
        Parser ps(p.body);
        auto n = std::make_unique<OutputNode>();
        n->e = ps.expression();
        ps.end();
        body.push_back(std::move(n));
        continue;
      }
      Parser ps(p.body);
      std::string kw = ps.name();
      if (std::find(stop.begin(), stop.end(), kw) != stop.end()) {
        *stopped_at = kw;
        --i_;  // the caller reads the tag again (its condition)
        return body;
      }
      if (kw == "if") body.push_back(if_(ps));
      else if (kw == "for") body.push_back(for_(ps));
      else if (kw == "set") body.push_back(set_(ps));
      else if (kw == "break" || kw == "continue") {
        ps.end();
        auto n = std::make_unique<ControlNode>();
        n->is_break = kw == "break";
        body.push_back(std::move(n));
      } else {
        fail("unsupported statement '" + kw + "'");
      }
    }
    if (!stop.empty()) fail("'" + stop.back() + "' is missing");
    return body;
  }

 private:
  std::string next_keyword(Parser& ps) {  // re-read the stop tag
    return ps.name();
  }
  NodeP if_(Parser& first) {
    auto n = std::make_unique<IfNode>();
    ExprP cond = first.expression();
    first.end();
    while (true) {
      std::string at;
      Body body = parse({"elif", "else", "endif"}, &at);
      n->branches.emplace_back(std::move(cond), std::move(body));
      Parser tag(ps_[i_++].body);
      tag.name();
      if (at == "endif") {
        tag.end();
        return n;
      }
      if (at == "else") {
        tag.end();
        Body rest = parse({"endif"}, &at);
        Parser end(ps_[i_++].body);
        end.name();
        end.end();
        n->branches.emplace_back(nullptr, std::move(rest));
        return n;
      }
      cond = tag.expression();  // elif
      tag.end();
    }
  }
  NodeP for_(Parser& ps) {
    auto n = std::make_unique<ForNode>();
    n->targets.push_back(ps.name());
    while (ps.accept_op(",")) n->targets.push_back(ps.name());
    ps.expect_name("in");
    n->iter = ps.condition();
    if (ps.accept_name("if")) n->filter = ps.condition();
    if (ps.accept_name("recursive")) fail("recursive loops are not supported");
    ps.end();
    std::string at;
    n->body = parse({"else", "endfor"}, &at);
    Parser tag(ps_[i_++].body);
    tag.name();
    tag.end();
    if (at == "else") {
      n->else_body = parse({"endfor"}, &at);
      Parser end(ps_[i_++].body);
      end.name();
      end.end();
    }
    return n;
  }
  NodeP set_(Parser& ps) {
    auto n = std::make_unique<SetNode>();
    n->name = ps.name();
    if (ps.accept_op(".")) n->attr = ps.name();
    if (!ps.accept_op("=")) fail("block set ({% set x %}...{% endset %}) is not supported");
    n->e = ps.expression();
    ps.end();
    return n;
  }

  const std::vector<Piece>& ps_;
  size_t i_ = 0;
};

}  // namespace

std::string render(const std::string& source, const json& context) {
  std::vector<Piece> pieces = lex(source);
  Builder b(pieces);
  std::string at;
  Body body = b.parse({}, &at);
  Scope sc;
  sc.frames.emplace_back();
  for (auto it = context.begin(); it != context.end(); ++it) sc.frames.back()[it.key()] = *it;
  std::string out;
  try {
    run_body(body, sc, out);
  } catch (const LoopControl&) {
    fail("break or continue outside a loop");
  }
  return out;
}

}  // namespace mtrt::jinja
