#pragma once
// Exceptions thrown by muon. Every message starts with "muon:" and names the parameter
// (or option) involved and, for tensors, its shape, so a failure in a model with hundreds of
// weights points at the one that is wrong.
#include <cstddef>
#include <span>
#include <stdexcept>
#include <string>

namespace muon {

using index_t = std::ptrdiff_t;

/// Base class of everything muon throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A hyper-parameter, schedule, shape or registration was rejected. Thrown at construction or
/// registration, never from inside step().
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A step() error about one parameter, named by parameter().
class ParameterError : public Error {
 public:
  ParameterError(const std::string& message, std::string parameter)
      : Error(message), parameter_(std::move(parameter)) {}
  [[nodiscard]] const std::string& parameter() const noexcept { return parameter_; }

 private:
  std::string parameter_;
};

/// step() met a NaN or Inf in a gradient under NonFinitePolicy::error. Nothing was modified.
class NonFiniteGradient : public ParameterError {
 public:
  using ParameterError::ParameterError;
};

/// step() found a Muon parameter's Newton–Schulz result not finite (its momentum overflowed,
/// say) under NonFinitePolicy::error. That parameter and its momentum were left as they were;
/// every other parameter took the step, which counts as taken.
class NonFiniteUpdate : public ParameterError {
 public:
  using ParameterError::ParameterError;
};

/// Optimizer state could not be saved or loaded. A failed load leaves the optimizer unchanged.
class StateError : public Error {
 public:
  using Error::Error;
};

/// A second thread called into an optimizer while another call was running in it. Optimizers are
/// not thread-safe; the late call is refused before it touches anything, and the running one
/// goes on undisturbed.
class ConcurrentUse : public Error {
 public:
  using Error::Error;
};

/// A file (.npy) could not be read or written.
class IoError : public Error {
 public:
  using Error::Error;
};

namespace detail {

inline std::string shape_string(std::span<const index_t> shape) {
  std::string s;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(shape[i]);
  }
  return shape.empty() ? std::string("scalar") : s;
}

inline std::string shape_string(index_t rows, index_t cols) {
  const index_t shape[2] = {rows, cols};
  return shape_string(shape);
}

}  // namespace detail
}  // namespace muon
