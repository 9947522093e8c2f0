#pragma once
// A small reader and writer for NumPy's .npy format (versions 1.0, 2.0 and 3.0), for float32
// and float64 arrays in C or Fortran order, either byte order. Malformed, truncated or
// unsupported files are refused with an IoError that says what is wrong. Format reference:
// numpy.lib.format (NEP 1).
#include <algorithm>
#include <bit>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "muon/core/error.hpp"

namespace muon::npy {

enum class DType { float32, float64 };

inline const char* to_string(DType d) { return d == DType::float32 ? "float32" : "float64"; }

/// An array converted to element type T, always in C (row-major) order.
template <class T>
struct Array {
  std::vector<index_t> shape;
  std::vector<T> data;
  DType stored = DType::float64;  ///< the dtype the file held
};

namespace detail {

[[noreturn]] inline void fail(const std::string& source, const std::string& why) {
  throw IoError("muon: " + source + ": " + why);
}

struct Header {
  DType dtype{};
  bool big_endian = false;
  bool fortran_order = false;
  std::vector<index_t> shape;
  std::size_t data_offset = 0;
};

/// Parses the header's Python dict literal: {'descr': '<f8', 'fortran_order': False,
/// 'shape': (3, 4), } with keys in any order.
class DictParser {
 public:
  DictParser(std::string_view text, const std::string& source) : s_(text), source_(source) {}

  Header parse() {
    Header h;
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      expect(':');
      if (key == "descr") {
        descr(string_literal(), h);
        have_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        have_order = true;
      } else if (key == "shape") {
        h.shape = tuple();
        have_shape = true;
      } else {
        fail(source_, "malformed .npy header: unexpected key '" + key + "'");
      }
      skip_space();
      if (peek() == ',') ++pos_;
    }
    if (!have_descr || !have_order || !have_shape)
      fail(source_, "malformed .npy header: it needs 'descr', 'fortran_order' and 'shape'");
    return h;
  }

 private:
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c)
      fail(source_, std::string("malformed .npy header: expected '") + c + "' at offset " +
                        std::to_string(pos_));
    ++pos_;
  }
  std::string string_literal() {
    skip_space();
    const char quote = peek();
    if (quote != '\'' && quote != '"')
      fail(source_, "malformed .npy header: expected a quoted string at offset " +
                        std::to_string(pos_));
    const std::size_t end = s_.find(quote, pos_ + 1);
    if (end == std::string_view::npos) fail(source_, "malformed .npy header: unterminated string");
    std::string out(s_.substr(pos_ + 1, end - pos_ - 1));
    pos_ = end + 1;
    return out;
  }
  bool boolean() {
    skip_space();
    for (auto [word, value] : {std::pair{"True", true}, std::pair{"False", false}}) {
      const std::size_t n = std::strlen(word);
      if (s_.substr(pos_, n) == word) {
        pos_ += n;
        return value;
      }
    }
    fail(source_, "malformed .npy header: fortran_order must be True or False");
  }
  std::vector<index_t> tuple() {
    expect('(');
    std::vector<index_t> out;
    while (true) {
      skip_space();
      if (peek() == ')') break;
      if (!std::isdigit(static_cast<unsigned char>(peek())))
        fail(source_, "malformed .npy header: shape entries must be non-negative integers");
      index_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(peek()))) {
        if (v > (std::numeric_limits<index_t>::max() - 9) / 10)
          fail(source_, "malformed .npy header: shape entry too large");
        v = v * 10 + (s_[pos_++] - '0');
      }
      out.push_back(v);
      skip_space();
      if (peek() == ',')
        ++pos_;
      else if (peek() != ')')
        fail(source_, "malformed .npy header: expected ',' or ')' in shape");
    }
    ++pos_;
    return out;
  }
  void descr(const std::string& d, Header& h) {
    if (d.size() == 3 && (d[0] == '<' || d[0] == '>' || d[0] == '=') && d[1] == 'f' &&
        (d[2] == '4' || d[2] == '8')) {
      h.dtype = d[2] == '4' ? DType::float32 : DType::float64;
      h.big_endian = d[0] == '>' || (d[0] == '=' && std::endian::native == std::endian::big);
      return;
    }
    fail(source_, "unsupported dtype '" + d + "' (muon reads float32 '<f4' and float64 '<f8')");
  }

  std::string_view s_;
  const std::string& source_;
  std::size_t pos_ = 0;
};

inline Header parse_header(std::string_view bytes, const std::string& source) {
  static constexpr char magic[] = "\x93NUMPY";
  if (bytes.size() < 10 || bytes.substr(0, 6) != std::string_view(magic, 6))
    fail(source, "not a .npy file (missing the \\x93NUMPY magic)");
  const auto major = static_cast<unsigned char>(bytes[6]);
  if (major < 1 || major > 3)
    fail(source, ".npy format version " + std::to_string(major) + " is not supported");
  std::size_t header_len = 0, prefix = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) |
                 (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    prefix = 10;
  } else {
    if (bytes.size() < 12) fail(source, "truncated .npy header");
    for (int i = 3; i >= 0; --i)
      header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    prefix = 12;
  }
  if (header_len > bytes.size() - prefix) fail(source, "truncated .npy header");
  Header h = DictParser(bytes.substr(prefix, header_len), source).parse();
  h.data_offset = prefix + header_len;
  return h;
}

template <class From, class T>
void convert(const char* src, std::size_t n, bool swap, T* dst) {
  for (std::size_t i = 0; i < n; ++i) {
    char buf[sizeof(From)];
    std::memcpy(buf, src + i * sizeof(From), sizeof(From));
    if (swap) std::reverse(buf, buf + sizeof(From));
    From v;
    std::memcpy(&v, buf, sizeof(From));
    dst[i] = static_cast<T>(v);
  }
}

}  // namespace detail

/// Parses a whole .npy file held in memory; `source` names it in error messages.
template <class T>
Array<T> parse(std::string_view bytes, const std::string& source = "<memory>") {
  const detail::Header h = detail::parse_header(bytes, source);
  std::size_t count = 1;
  for (index_t e : h.shape) {
    if (e != 0 && count > (std::size_t{1} << 40) / static_cast<std::size_t>(e))
      detail::fail(source, "array too large (more than 2^40 elements)");
    count *= static_cast<std::size_t>(e);
  }
  const std::size_t item = h.dtype == DType::float32 ? 4 : 8;
  const std::size_t have = bytes.size() - h.data_offset;
  if (have < count * item)
    detail::fail(source, "truncated data: the header promises " + std::to_string(count * item) +
                             " bytes, the file has " + std::to_string(have));
  if (have > count * item)
    detail::fail(source, std::to_string(have - count * item) + " unexpected bytes after the data");
  Array<T> out{h.shape, std::vector<T>(count), h.dtype};
  const char* src = bytes.data() + h.data_offset;
  const bool swap = h.big_endian != (std::endian::native == std::endian::big);
  std::vector<T> raw(count);
  if (h.dtype == DType::float32)
    detail::convert<float>(src, count, swap, h.fortran_order ? raw.data() : out.data.data());
  else
    detail::convert<double>(src, count, swap, h.fortran_order ? raw.data() : out.data.data());
  if (h.fortran_order && count > 0) {
    // Fortran order: the first index varies fastest. Walk C order and map each multi-index.
    const std::size_t nd = h.shape.size();
    std::vector<index_t> idx(nd, 0);
    for (std::size_t c = 0; c < count; ++c) {
      std::size_t f = 0, stride = 1;
      for (std::size_t d = 0; d < nd; ++d) {
        f += static_cast<std::size_t>(idx[d]) * stride;
        stride *= static_cast<std::size_t>(h.shape[d]);
      }
      out.data[c] = raw[f];
      for (std::size_t d = nd; d-- > 0;) {
        if (++idx[d] < h.shape[d]) break;
        idx[d] = 0;
      }
    }
  }
  return out;
}

template <class T>
Array<T> read(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail(path.string(), "cannot open for reading");
  const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  return parse<T>(bytes, path.string());
}

/// The bytes of a .npy file (version 1.0, or 2.0 for very long headers) holding `data` (C order) with `shape`.
template <class T>
std::string serialize(const std::vector<index_t>& shape, const T* data) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  std::string dict = std::string("{'descr': '") + (std::endian::native == std::endian::big ? '>' : '<') +
                     (sizeof(T) == 4 ? "f4" : "f8") + "', 'fortran_order': False, 'shape': (";
  std::size_t count = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? ", " : "");
    count *= static_cast<std::size_t>(shape[i]);
  }
  if (shape.size() == 1) dict.pop_back();  // "(5,)" rather than "(5, )"
  dict += "), }";
  // Version 1.0 stores the header length in 2 bytes; longer headers (thousands of dimensions)
  // need version 2.0's 4 bytes.
  const bool v2 = 10 + dict.size() + 64 > 65535;
  const std::size_t prefix = v2 ? 12 : 10;
  dict.append((64 - (prefix + dict.size() + 1) % 64) % 64, ' ');
  dict += '\n';
  std::string out(v2 ? "\x93NUMPY\x02\x00" : "\x93NUMPY\x01\x00", 8);
  for (std::size_t i = 0; i < prefix - 8; ++i) out += static_cast<char>((dict.size() >> (8 * i)) & 0xff);
  out += dict;
  out.append(reinterpret_cast<const char*>(data), count * sizeof(T));
  return out;
}

template <class T>
void write(const std::filesystem::path& path, const std::vector<index_t>& shape, const T* data) {
  const std::string bytes = serialize(shape, data);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) detail::fail(path.string(), "cannot write");
}

}  // namespace muon::npy
