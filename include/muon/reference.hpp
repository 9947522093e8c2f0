#pragma once
// Independent double-precision references for tests and diagnostics (Eigen, host memory):
// the exact msign(X) = U V^T by SVD, and singular values. Never used by step().
#include <Eigen/Core>
#include <Eigen/SVD>

#include "muon/core/matrix_view.hpp"

namespace muon::reference {

/// Copies any host view into a double-precision Eigen matrix.
template <class T>
Eigen::MatrixXd to_double(MatrixView<const T> x) {
  Eigen::MatrixXd out(x.rows(), x.cols());
  for (index_t i = 0; i < x.rows(); ++i)
    for (index_t j = 0; j < x.cols(); ++j) out(i, j) = static_cast<double>(x(i, j));
  return out;
}

// Templates, not inline functions, so that a program which includes this header without
// calling them does not compile Eigen's SVD (about 20 s of g++ per translation unit).
template <int = 0>
Eigen::VectorXd singular_values(const Eigen::MatrixXd& x) {
  return Eigen::BDCSVD<Eigen::MatrixXd>(x).singularValues();
}

/// msign(X) = U V^T of the thin SVD X = U S V^T (zero singular values give zero directions).
template <int = 0>
Eigen::MatrixXd msign(const Eigen::MatrixXd& x) {
  if (x.size() == 0) return x;
  Eigen::BDCSVD<Eigen::MatrixXd> svd(x, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd& s = svd.singularValues();
  const double cutoff = s.size() ? s(0) * 1e-12 : 0.0;
  Eigen::VectorXd ones = (s.array() > cutoff).cast<double>();
  return svd.matrixU() * ones.asDiagonal() * svd.matrixV().transpose();
}

}  // namespace muon::reference
