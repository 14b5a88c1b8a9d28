// Do the files of an artifact still match the sha256 its manifest recorded? (runtime/integrity.py's rules.)
// A file is hashed in full once; its identity (device, inode, size, mtime and ctime in nanoseconds) is then
// remembered with the hash under $MISTRAL_TRT_CACHE, else $XDG_CACHE_HOME/mistral-trt, else
// ~/.cache/mistral-trt: the same records the Python runtime writes, so either runtime's first start spares
// the other the hash of a 14 GB model.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace mtrt {

std::string sha256_hex(const std::string& bytes);
std::string sha256_file(const std::string& path);

// Error naming the first file that is missing or whose sha256 differs; `where` is the manifest's path.
void check_files(const std::string& folder, const std::vector<std::pair<std::string, std::string>>& files, const std::string& where,
                 bool full = false);

}  // namespace mtrt
