#pragma once
// Diagnostics named by the Muon literature (host memory, computed in double by SVD):
//   update_rms          ||dW||_F / sqrt(rows cols)   (AdamW's is about 0.2-0.4, Moonlight)
//   svd_entropy         -(1/log n) sum p_i log p_i, p_i = s_i^2 / sum s_j^2  (Moonlight;
//                       1 for an orthogonal matrix, 0 for rank one)
//   orthogonality       singular-value range of an NS result, max |s_i - 1|, ||O O^T - I||_F
//                       on the short side, and the distance to the exact msign.
#include <algorithm>
#include <cmath>

#include "muon/reference.hpp"

namespace muon {

template <class T>
double update_rms(MatrixView<const T> delta) {
  if (delta.empty()) return 0.0;
  const Eigen::MatrixXd d = reference::to_double(delta);
  return d.norm() / std::sqrt(static_cast<double>(d.size()));
}

template <class T>
double svd_entropy(MatrixView<const T> w) {
  if (std::min(w.rows(), w.cols()) < 2) return 0.0;
  const Eigen::VectorXd s = reference::singular_values(reference::to_double(w));
  const double total = s.squaredNorm();
  if (total == 0) return 0.0;
  double h = 0;
  for (double si : s) {
    const double p = si * si / total;
    if (p > 0) h -= p * std::log(p);
  }
  return h / std::log(static_cast<double>(s.size()));
}

struct Orthogonality {
  double s_min = 0, s_max = 0;     ///< singular-value range of O
  double max_deviation = 0;        ///< max_i |s_i - 1|
  double gram_defect = 0;          ///< ||O O^T - I||_F on the short side
  double msign_distance = 0;       ///< ||O - msign(X)||_F / sqrt(min(m, n))
};

/// How close `o` (e.g. a Newton–Schulz result) is to orthogonal and to msign(`input`).
template <class T, class U>
Orthogonality orthogonality(MatrixView<const T> o, MatrixView<const U> input) {
  Orthogonality r;
  if (o.empty()) return r;
  const Eigen::MatrixXd od = reference::to_double(o);
  const Eigen::VectorXd s = reference::singular_values(od);
  r.s_min = s.minCoeff();
  r.s_max = s.maxCoeff();
  r.max_deviation = (s.array() - 1.0).abs().maxCoeff();
  const Eigen::MatrixXd gram = od.rows() <= od.cols() ? Eigen::MatrixXd(od * od.transpose())
                                                      : Eigen::MatrixXd(od.transpose() * od);
  r.gram_defect = (gram - Eigen::MatrixXd::Identity(gram.rows(), gram.cols())).norm();
  r.msign_distance = (od - reference::msign(reference::to_double(input))).norm() /
                     std::sqrt(static_cast<double>(std::min(od.rows(), od.cols())));
  return r;
}

}  // namespace muon
