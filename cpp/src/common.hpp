// Shared by every part of the C++ runtime: the one error type, and JSON printed the way Python prints it
// (so an error line names a value exactly as the Python runtime's does).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mtrt {

using json = nlohmann::ordered_json;  // keeps the file's key order, as Python's json does

// Bad input: the message names the file, field or parameter and what was expected (one line). The CLI prints
// it and exits 2; the C ABI returns MTRT_BAD_INPUT with it as the error string.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// json.dumps(v, ensure_ascii=False) of Python: ", " and ": " separators, keys in order, floats as repr().
std::string py_dumps(const json& v);
// repr() of a JSON scalar as Python shows it: None, True, 2, 'text'.
std::string py_repr(const json& v);

// Read a whole file; Error naming it when it cannot be read.
std::string read_file(const std::string& path);
// Parse a JSON file: Error "{path}: missing" / "cannot read" / "not valid JSON: ..." as runtime/errors.py says.
json read_json(const std::string& path);

bool is_file(const std::string& path);
bool is_dir(const std::string& path);
std::string join_path(const std::string& a, const std::string& b);

}  // namespace mtrt
