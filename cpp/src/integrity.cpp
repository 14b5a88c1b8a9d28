#include "integrity.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include "common.hpp"

namespace mtrt {

namespace {

// FIPS 180-4 SHA-256.
class Sha256 {
 public:
  void update(const unsigned char* p, size_t n) {
    total_ += n;
    while (n) {
      size_t take = std::min(n, 64 - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take, p += take, n -= take;
      if (fill_ == 64) block(buf_), fill_ = 0;
    }
  }
  std::string hex() {
    uint64_t bits = total_ * 8;
    unsigned char pad = 0x80;
    update(&pad, 1);
    unsigned char zero = 0;
    while (fill_ != 56) update(&zero, 1);
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(len, 8);
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
    return std::string(out, 64);
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

constexpr long long kAnnounceBytes = 1LL << 30;

std::string cache_dir() {
  if (const char* c = std::getenv("MISTRAL_TRT_CACHE"); c && *c) return c;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return join_path(x, "mistral-trt");
  const char* home = std::getenv("HOME");
  return join_path(join_path(home ? home : ".", ".cache"), "mistral-trt");
}

std::string identity(const struct stat& st) {
  auto ns = [](const struct timespec& t) { return std::to_string(static_cast<long long>(t.tv_sec) * 1000000000LL + t.tv_nsec); };
  return std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" + std::to_string(st.st_size) + ":" +
         ns(st.st_mtim) + ":" + ns(st.st_ctim);
}

std::string record_path(const struct stat& st) {
  return join_path(join_path(cache_dir(), "sha256"), sha256_hex(identity(st)).substr(0, 40));
}

std::string remembered(const struct stat& st) {
  std::ifstream f(record_path(st));
  std::string digest;
  f >> digest;
  return digest;
}

void remember(const struct stat& st, const std::string& digest) {
  std::string dir = join_path(cache_dir(), "sha256"), rec = record_path(st);
  for (size_t i = 1; i <= dir.size(); ++i)  // mkdir -p; failures only mean the next start hashes again
    if (i == dir.size() || dir[i] == '/') ::mkdir(dir.substr(0, i).c_str(), 0755);
  std::string tmp = rec + "." + std::to_string(::getpid()) + ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) return;
    f << digest << "\n";
    if (!f) return;
  }
  std::rename(tmp.c_str(), rec.c_str());
}

}  // namespace

std::string sha256_hex(const std::string& bytes) {
  Sha256 h;
  h.update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  return h.hex();
}

std::string sha256_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": cannot read: " + std::strerror(errno));
  Sha256 h;
  std::vector<unsigned char> buf(1 << 24);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      throw Error(path + ": cannot read: " + std::strerror(errno));
    }
    if (n == 0) break;
    h.update(buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return h.hex();
}

void check_files(const std::string& folder, const std::vector<std::pair<std::string, std::string>>& files, const std::string& where,
                 bool full) {
  for (const auto& [name, want] : files) {
    std::string path = join_path(folder, name);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0)
      throw Error(path + ": missing (listed in " + where + "); the artifact is incomplete");
    if (!full && remembered(st) == want) continue;
    if (st.st_size >= kAnnounceBytes)
      std::fprintf(stderr, "checking the sha256 of %s (%.1f GB) against %s; later starts skip this while the file is "
                   "unchanged\n", path.c_str(), st.st_size / 1e9, where.c_str());
    std::string got = sha256_file(path);
    if (got != want)
      throw Error(path + ": sha256 " + got.substr(0, 16) + "... differs from " + where + "'s " + want.substr(0, 16) +
                  "...: the file was changed or replaced after export; export it again");
    struct stat after;
    if (::stat(path.c_str(), &after) == 0 && after.st_mtim.tv_sec == st.st_mtim.tv_sec &&
        after.st_mtim.tv_nsec == st.st_mtim.tv_nsec)
      remember(st, got);  // unchanged while we read it
  }
}

}  // namespace mtrt
