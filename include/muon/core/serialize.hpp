#pragma once
// Internal: included by the library's own headers, not by programs.
// The byte-level pieces of muon's optimizer-state format: little-endian integers and scalars,
// length-prefixed strings, and a trailing FNV-1a 64-bit checksum of everything before it
// (any single changed byte changes it). The layout itself is documented in driver/state_file.hpp.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <iterator>
#include <string>
#include <string_view>
#include <type_traits>

#include "muon/core/error.hpp"

namespace muon::detail {

inline constexpr char kStateMagic[8] = {'\x89', 'M', 'U', 'O', 'N', '\r', '\n', '\x1a'};
inline constexpr std::uint32_t kStateVersion = 1;

inline std::uint64_t fnv1a64(std::string_view bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

/// Copies n trivially-copyable values to/from little-endian bytes.
template <class V>
void to_little_endian(const V* src, std::size_t n, char* dst) {
  static_assert(std::is_trivially_copyable_v<V>);
  if (n == 0) return;  // src or dst may be null for an empty parameter; memcpy forbids that
  std::memcpy(dst, src, n * sizeof(V));
  if constexpr (std::endian::native == std::endian::big)
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < sizeof(V) / 2; ++j)
        std::swap(dst[i * sizeof(V) + j], dst[i * sizeof(V) + sizeof(V) - 1 - j]);
}
template <class V>
void from_little_endian(const char* src, std::size_t n, V* dst) {
  if (n == 0) return;
  if constexpr (std::endian::native == std::endian::big) {
    for (std::size_t i = 0; i < n; ++i) {
      char tmp[sizeof(V)];
      for (std::size_t j = 0; j < sizeof(V); ++j) tmp[j] = src[i * sizeof(V) + sizeof(V) - 1 - j];
      std::memcpy(dst + i, tmp, sizeof(V));
    }
  } else {
    std::memcpy(dst, src, n * sizeof(V));
  }
}

/// Whether n little-endian scalars of type V at src are all finite.
template <class V>
bool all_finite_little_endian(const char* src, std::size_t n) {
  V chunk[256];
  for (std::size_t i = 0; i < n; i += 256) {
    const std::size_t m = std::min<std::size_t>(256, n - i);
    from_little_endian(src + i * sizeof(V), m, chunk);
    for (std::size_t j = 0; j < m; ++j)
      if (!std::isfinite(chunk[j])) return false;
  }
  return true;
}

class StateWriter {
 public:
  template <class V>
  void put(V value) {
    put_array(&value, 1);
  }
  template <class V>
  void put_array(const V* values, std::size_t n) {
    const std::size_t at = bytes_.size();
    bytes_.resize(at + n * sizeof(V));
    to_little_endian(values, n, bytes_.data() + at);
  }
  void put_string(std::string_view s) {
    put<std::uint64_t>(s.size());
    bytes_.append(s);
  }
  void put_raw(std::string_view s) { bytes_.append(s); }
  /// The bytes written so far followed by their checksum.
  std::string finish() {
    put<std::uint64_t>(fnv1a64(bytes_));
    return std::move(bytes_);
  }

 private:
  std::string bytes_;
};

/// Everything `in` holds, as bytes; a failing stream (a directory opened as a file, an I/O
/// error) is a StateError, not the stream's own exception.
inline std::string read_all(std::istream& in, const char* who) {
  try {
    std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (in.bad()) throw StateError(std::string("muon: ") + who + ": reading the state failed");
    return bytes;
  } catch (const std::ios_base::failure& e) {
    throw StateError(std::string("muon: ") + who + ": reading the state failed: " + e.what());
  }
}

/// Writes what write(std::ostream&) writes to `path` through `path.tmp` and a rename, so that a
/// crash mid-write never leaves a half-written file under the real name. Every failure is a
/// StateError naming the path, and leaves no temporary file behind.
template <class Write>
void write_file_atomically(const std::filesystem::path& path, const char* who, Write&& write) {
  namespace fs = std::filesystem;
  const std::string where = std::string("muon: ") + who + ": '" + path.string() + "'";
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw StateError(where + " is a directory, not a file");
  const fs::path tmp = path.string() + ".tmp";
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw StateError(where + ": cannot open '" + tmp.string() + "' for writing");
    write(out);
    out.close();
    if (!out) throw StateError(where + ": writing '" + tmp.string() + "' failed");
    fs::rename(tmp, path, ec);
    if (ec) throw StateError(where + ": cannot rename '" + tmp.string() + "' to it: " + ec.message());
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
}

/// Opens `path` for read(std::istream&); a directory or a missing file is a StateError naming it.
template <class Read>
void read_file(const std::filesystem::path& path, const char* who, Read&& read) {
  const std::string where = std::string("muon: ") + who + ": '" + path.string() + "'";
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw StateError(where + " is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw StateError(where + ": cannot open it");
  read(in);
}

class StateReader {
 public:
  explicit StateReader(std::string_view bytes) : bytes_(bytes) {}

  template <class V>
  V get(const char* what) {
    V v;
    get_array(&v, 1, what);
    return v;
  }
  template <class V>
  void get_array(V* out, std::size_t n, const char* what) {
    from_little_endian(take(n, sizeof(V), what), n, out);
  }
  /// Skips n values of size `size`, checking they are there; returns where they start.
  const char* take(std::size_t n, std::size_t size, const char* what) {
    if (size != 0 && n > (bytes_.size() - pos_) / size)
      throw StateError("muon: optimizer state is truncated: " + std::string(what) +
                       " runs past the end of the data (at byte " + std::to_string(pos_) + ")");
    const char* p = bytes_.data() + pos_;
    pos_ += n * size;
    return p;
  }
  std::string get_string(std::size_t max_length, const char* what) {
    const auto n = get<std::uint64_t>(what);
    if (n > max_length)
      throw StateError("muon: optimizer state is corrupted: " + std::string(what) + " length " +
                       std::to_string(n) + " exceeds " + std::to_string(max_length));
    return {take(n, 1, what), n};
  }
  [[nodiscard]] std::size_t remaining() const { return bytes_.size() - pos_; }

 private:
  std::string_view bytes_;
  std::size_t pos_ = 0;
};

}  // namespace muon::detail
