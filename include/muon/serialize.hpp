#pragma once
// The byte-level pieces of muon's optimizer-state format: little-endian integers and scalars,
// length-prefixed strings, and a trailing FNV-1a 64-bit checksum of everything before it
// (any single changed byte changes it). The layout itself is documented in optimizer.hpp.
#include <bit>
#include <cstdint>
#include <cstring>
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
