#pragma once
// muon: the Muon optimizer for C++ (header-only). This umbrella header is backend-free and
// needs no third-party headers; add a backend: <muon/eigen.hpp> for the CPU.
#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/error.hpp"
#include "muon/core/matrix_view.hpp"
#include "muon/core/options.hpp"
#include "muon/core/schedule.hpp"
#include "muon/optimizer.hpp"
#include "muon/version.hpp"
