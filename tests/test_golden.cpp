// Golden values from the independent NumPy float64 reference (tests/reference/
// muon_reference.py generate tests/golden): Newton-Schulz outputs and whole Muon and AdamW
// trajectories; and from the public implementations of the other rules, run by
// tests/reference/peer_reference.py (peer_cases.txt: Muon, AdamW, Lion and NorMuon with and
// without cautious weight decay against microsoft/dion; PolarGrad, AdaMuon, NAMO, NorMuon under
// its convention and the Newton-Schulz coefficient sets against NVIDIA's Emerging-Optimizers). Float runs
// start from the same float64 inputs rounded to float.
#include <catch2/catch.hpp>

#include "test_support.hpp"

using namespace muon_test;

namespace {

/// Element k of a golden stack (leading dimension) as a row-major vector.
template <class T>
std::vector<T> slice(const muon::npy::Array<double>& a, std::size_t k) {
  const std::size_t n = a.data.size() / static_cast<std::size_t>(a.shape[0]);
  return std::vector<T>(a.data.begin() + static_cast<std::ptrdiff_t>(k * n),
                        a.data.begin() + static_cast<std::ptrdiff_t>((k + 1) * n));
}

template <class T>
double relative_error(const std::vector<T>& got, const std::vector<double>& want) {
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < got.size(); ++i) {
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

/// Registers the case's weight with `add` (add_muon or add_adamw), replays its gradients and
/// checks the weight after every step against the reference trajectory in `stack`
/// (w0, g_1..g_T, w_1..w_T).
template <class T, class Add>
void replay(const GoldenCase& c, const muon::npy::Array<double>& stack,
            muon::Optimizer<muon::EigenBackend, T>& opt, Add add) {
  const std::size_t steps = (static_cast<std::size_t>(stack.shape[0]) - 1) / 2;
  std::vector<T> w = slice<T>(stack, 0), grad(w.size());
  add(opt, muon::TensorView<T>{w.data(), c.shape}, muon::TensorView<const T>{grad.data(), c.shape});
  for (std::size_t t = 0; t < steps; ++t) {
    const auto gt = slice<T>(stack, 1 + t);
    std::copy(gt.begin(), gt.end(), grad.begin());
    opt.step();
    INFO(c.name << " step " << t + 1);
    CHECK(relative_error(w, slice<double>(stack, 1 + steps + t)) < Tol<T>::trajectory);
  }
}

/// Replays every `kind` case of `file` (there must be `count`): `configure(c, g)` sets the
/// group's options from the case, `add(c, opt, w, grad)` registers its weight.
template <class T, class Configure, class Add>
void replay_cases(const std::string& kind, const std::string& file, std::size_t count,
                  Configure configure, Add add) {
  const auto cases = golden_cases(kind, file);
  REQUIRE(cases.size() == count);
  for (const auto& c : cases) {
    const auto stack = muon::npy::read<double>(golden_path(kind + "_" + c.name + ".npy"));
    muon::GroupOptions g;
    configure(c, g);
    muon::Optimizer<muon::EigenBackend, T> opt(g);
    replay(c, stack, opt, [&](auto& o, auto w, auto grad) { add(c, o, w, grad); });
  }
}

template <class T>
void check_newton_schulz_cases(const std::string& kind, const std::string& file,
                               std::size_t count,
                               std::initializer_list<muon::NewtonSchulzMethod> methods) {
  const auto cases = golden_cases(kind, file);
  REQUIRE(cases.size() == count);
  for (const auto& c : cases) {
    const auto stack = muon::npy::read<double>(golden_path(kind + "_" + c.name + ".npy"));
    const auto m = c.shape[0], n = c.shape[1];
    const std::vector<T> x = slice<T>(stack, 0);
    std::vector<T> o(x.size());
    muon::NewtonSchulzOptions opts;
    opts.schedule = muon::Schedule::from_name(c.opt.at("schedule"));
    opts.steps = std::stoi(c.opt.at("steps"));
    for (const auto method : methods) {
      opts.method = method;
      muon::EigenBackend backend;
      muon::orthogonalize(backend, muon::row_major_view<muon::HostSpace, const T>(x.data(), m, n),
                          muon::row_major_view(o.data(), m, n), opts);
      INFO(c.name << " method " << int(method));
      CHECK(relative_error(o, slice<double>(stack, 1)) < Tol<T>::ns);
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("Newton-Schulz matches the NumPy reference", "[golden]", float, double) {
  check_newton_schulz_cases<TestType>("ns", "cases.txt", 20, {muon::NewtonSchulzMethod::automatic});
}

TEMPLATE_TEST_CASE("Newton-Schulz coefficient sets match Emerging-Optimizers' muon_utils", "[golden]",
                   float, double) {
  // both forms: the cubic steps (c = 0) skip a product in each
  check_newton_schulz_cases<TestType>(
      "nsset", "peer_cases.txt", 12,
      {muon::NewtonSchulzMethod::standard, muon::NewtonSchulzMethod::gram});
}

TEMPLATE_TEST_CASE("Muon trajectories match the NumPy reference", "[golden]", float, double) {
  replay_cases<TestType>(
      "muon", "cases.txt", 6,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        g.muon.lr = c.num("lr");
        g.muon.weight_decay = c.num("wd");
        g.muon.momentum = c.num("momentum");
        g.muon.nesterov = c.opt.at("nesterov") == "1";
        g.muon.momentum_form = muon::momentum_form_from_name(c.opt.at("form"));
        g.muon.scale = muon::scale_mode_from_name(c.opt.at("scale"));
        g.muon.rms_factor = c.num("rms");
        g.muon.newton_schulz.schedule = muon::Schedule::from_name(c.opt.at("sched"));
        g.muon.newton_schulz.steps = std::stoi(c.opt.at("ns_steps"));
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) { opt.add_muon(c.name, w, grad); });
}

TEMPLATE_TEST_CASE("AdamW trajectories match the NumPy reference", "[golden]", float, double) {
  replay_cases<TestType>(
      "adamw", "cases.txt", 2,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        g.adamw = {c.num("lr"), c.num("beta1"), c.num("beta2"), c.num("eps"), c.num("wd")};
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) { opt.add_adamw(c.name, w, grad); });
}

TEMPLATE_TEST_CASE("AdamW trajectories match dion's adamw_update, cautious decay included",
                   "[golden]", float, double) {
  replay_cases<TestType>(
      "adamw", "peer_cases.txt", 2,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        g.adamw = {c.num("lr"), c.num("beta1"), c.num("beta2"), c.num("eps"), c.num("wd"),
                   c.num("cautious") != 0};
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) { opt.add_adamw(c.name, w, grad); });
}

TEMPLATE_TEST_CASE("Lion trajectories match dion's lion_update", "[golden]", float, double) {
  replay_cases<TestType>(
      "lion", "peer_cases.txt", 4,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        g.lion = {c.num("lr"), c.num("beta1"), c.num("beta2"), c.num("wd"),
                  c.opt.count("cautious") != 0 && c.num("cautious") != 0};
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) {
        opt.add(muon::rules::Lion{}, c.name, w, grad);
      });
}

namespace {
/// The Muon options of a case run by dion's Muon or NorMuon (sum momentum; adjust_lr).
void dion_options(const GoldenCase& c, muon::MuonOptions& o) {
  o.lr = c.num("lr");
  o.momentum = c.num("mu");
  o.momentum_form = muon::MomentumForm::sum;
  o.weight_decay = c.num("wd");
  o.nesterov = c.num("nesterov") != 0;
  o.cautious_weight_decay = c.opt.count("cautious") != 0 && c.num("cautious") != 0;
  const std::string adjust = c.opt.at("adjust");
  o.scale = adjust == "spectral" ? muon::ScaleMode::spectral
            : adjust == "rms"    ? muon::ScaleMode::match_rms_adamw
                                 : muon::ScaleMode::none;
}
}  // namespace

TEMPLATE_TEST_CASE("Muon trajectories match dion's Muon, cautious decay included", "[golden]",
                   float, double) {
  replay_cases<TestType>(
      "muon", "peer_cases.txt", 3,
      [](const GoldenCase& c, muon::GroupOptions& g) { dion_options(c, g.muon); },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) { opt.add_muon(c.name, w, grad); });
}

TEMPLATE_TEST_CASE("NorMuon trajectories match dion's NorMuon", "[golden]", float, double) {
  replay_cases<TestType>(
      "normuon", "peer_cases.txt", 5,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        muon::NorMuonOptions& o = g.normuon;
        dion_options(c, o);
        o.beta2 = c.num("beta2");
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) {
        const muon::rules::NorMuon rule;
        if (c.opt.count("split") != 0)
          opt.add(rule, c.name, w.flattened(), grad.flattened(), muon::Split{0, {2, 4}});
        else if (c.shape.size() == 3)
          opt.add(rule, c.name, w, grad, muon::Experts{});
        else
          opt.add(rule, c.name, w, grad);
      });
}

namespace {
/// The Muon options of a case run by an Emerging-Optimizers rule (EMA momentum, its
/// coefficient set).
void eo_options(const GoldenCase& c, muon::MuonOptions& o) {
  o.lr = c.num("lr");
  o.momentum = c.num("mu");
  o.weight_decay = c.num("wd");
  o.nesterov = c.num("nesterov") != 0;
  o.newton_schulz.schedule = muon::Schedule::from_name(c.opt.at("coefficients"));
}
}  // namespace

TEMPLATE_TEST_CASE("PolarGrad trajectories match Emerging-Optimizers' PolarGrad", "[golden]", float,
                   double) {
  replay_cases<TestType>(
      "polargrad", "peer_cases.txt", 3,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        eo_options(c, g.polargrad);
        g.polargrad.extra_scale = c.num("extra");
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) {
        opt.add(muon::rules::PolarGrad{}, c.name, w, grad);
      });
}

namespace {
/// The options of a case run by Emerging-Optimizers' AdaptiveMuon: its scale modes as muon's,
/// its extra_scale_factor as rms_factor.
void adaptive_options(const GoldenCase& c, muon::MuonOptions& o) {
  eo_options(c, o);
  const std::string mode = c.opt.at("mode");
  o.scale = mode == "spectral"        ? muon::ScaleMode::match_rms_adamw
            : mode == "shape_scaling" ? muon::ScaleMode::original
                                      : muon::ScaleMode::spectral;
  o.rms_factor = c.num("extra");
}
}  // namespace

TEMPLATE_TEST_CASE("AdaMuon and NAMO trajectories match Emerging-Optimizers' AdaptiveMuon",
                   "[golden]", float, double) {
  const auto moments = [](const GoldenCase& c, muon::AdaMuonOptions& o) {
    adaptive_options(c, o);
    o.beta2 = c.num("beta2");
    o.moment_eps = c.num("eps");
  };
  replay_cases<TestType>(
      "adamuon", "peer_cases.txt", 3,
      [&](const GoldenCase& c, muon::GroupOptions& g) { moments(c, g.adamuon); },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) {
        opt.add(muon::rules::AdaMuon{}, c.name, w, grad);
      });
  replay_cases<TestType>(
      "namo", "peer_cases.txt", 3,
      [&](const GoldenCase& c, muon::GroupOptions& g) { moments(c, g.namo); },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) {
        opt.add(muon::rules::Namo{}, c.name, w, grad);
      });
}

TEMPLATE_TEST_CASE("NorMuon under Emerging-Optimizers' convention matches its AdaptiveMuon "
                   "(a wide matrix per column)", "[golden]", float, double) {
  replay_cases<TestType>(
      "normuon_eo", "peer_cases.txt", 4,
      [](const GoldenCase& c, muon::GroupOptions& g) {
        muon::NorMuonOptions& o = g.normuon;
        adaptive_options(c, o);
        o.momentum_form = muon::MomentumForm::ema;
        o.beta2 = c.num("beta2");
        o.row_eps = c.num("eps");
        o.convention = muon::NorMuonConvention::emerging_optimizers;
      },
      [](const GoldenCase& c, auto& opt, auto w, auto grad) {
        opt.add(muon::rules::NorMuon{}, c.name, w, grad);
      });
}
