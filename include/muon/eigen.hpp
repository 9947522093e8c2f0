#pragma once
// Everything muon offers on the CPU with Eigen: the optimizer, the Eigen backend and adapters,
// the SVD reference and diagnostics.
#include "muon/adapters/eigen.hpp"
#include "muon/backend/eigen.hpp"
#include "muon/diagnostics.hpp"
#include "muon/muon.hpp"
#include "muon/reference.hpp"
