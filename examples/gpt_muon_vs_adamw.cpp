// What Muon is for: a small GPT trained on English text twice, with Muon (hidden matrices) +
// AdamW (embeddings, head, gains) through muon::libtorch::Muon, and with torch::optim::AdamW
// alone; the same model, initial weights, batches and schedule for both. For each optimizer it
// sweeps the learning rates given, keeps the one with the lowest final validation loss, and
// reports how many steps Muon needs to reach AdamW's best final validation loss.
//
// The model: byte tokens, token and position embeddings, `layers` blocks of causal attention
// (fused QKV, orthogonalized as three matrices through muon::Split) and a 4x MLP, RMSNorm
// before each and at the end, an untied head. The text: Debian's `fortunes` package (quotes,
// literature, definitions); every tenth fortune (which tenth is chosen by --split) is held out.
// The protocol is in docs/gpt_experiment.md.
//
// Data parallel: under `mpiexec -n N` (when built with MPI) every process trains on its Nth of
// each batch; the Muon runs use muon::libtorch::ShardedMuon over MPI (zero1), which averages the
// gradients in step(), and the AdamW runs average them with one MPI_Allreduce per parameter.
// `--micro-batches K` splits each batch the same way within one process (gradient
// accumulation): N processes and K = N micro-batches give the same bits (docs/gpt_experiment.md).
//
//   [mpiexec -n N] gpt_muon_vs_adamw [--steps 600] [--muon-lr 0.016 ...] [--adamw-lr 0.008 ...]
//                     [--qk-clip TAU] [--micro-batches K] [--csv curves.csv] [--check-resume]
//                     (--help for all)
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iterator>
#include <limits>
#include <memory>
#include <muon/adapters/libtorch_optimizer.hpp>
#include <muon/diagnostics.hpp>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#if defined(MUON_EXAMPLE_MPI)
#include <mpi.h>

#include <muon/distributed/mpi.hpp>
#include <muon/distributed/sharded_optimizer.hpp>
#endif

namespace {

struct Config {
  std::vector<std::string> text{"/usr/share/games/fortunes"};
  int steps = 600, width = 128, layers = 4, heads = 4, context = 64, batch = 32;
  double warmup = 0.05;  // share of the steps spent warming up, then cosine to zero
  double weight_decay = 0.1;
  double qk_clip = 0;  // Muon runs: QK-clip's threshold on the attention logits (0: off)
  // Each optimizer's best peak rate of the sweep in docs/gpt_experiment.md.
  std::vector<double> muon_lr{0.016}, adamw_lr{0.008};
  int eval_every = 25, eval_batches = 16, seed = 0, split = 0;
  int micro_batches = 1, threads = 0;
  std::string csv;
  bool check_resume = false;
};

/// The processes of this run: one, or those mpiexec started.
struct World {
  int rank = 0, size = 1;
  [[nodiscard]] bool parallel() const { return size > 1; }
  [[nodiscard]] bool speaks() const { return rank == 0; }  // prints and writes files
};
World world;

/// Whether mpiexec started this process (OpenMPI, MPICH and PMIx set one of these).
bool launched_by_mpiexec() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

/// The sum (or the largest) over the processes of a host value: what is shown.
double over_ranks(double x, bool largest = false) {
#if defined(MUON_EXAMPLE_MPI)
  if (world.parallel())
    MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, largest ? MPI_MAX : MPI_SUM, MPI_COMM_WORLD);
#else
  (void)largest;
#endif
  return x;
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// ---- the text -------------------------------------------------------------------------------

struct Text {
  torch::Tensor train, validation;  // byte tokens, int64
};

/// The fortunes of every file named (a directory: its fortune files, ascii-art left out),
/// every tenth one (index % 10 == split) held out for validation.
Text read_text(const Config& c) {
  std::vector<std::filesystem::path> files;
  for (const std::filesystem::path p : c.text) {
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p))
        if (e.is_regular_file() && !e.is_symlink() && !e.path().has_extension() &&
            e.path().filename() != "ascii-art")
          files.push_back(e.path());
    } else if (std::filesystem::is_regular_file(p)) {
      files.push_back(p);
    } else {
      throw std::invalid_argument("--text: '" + p.string() + "' is neither a file nor a directory "
                                  "(Debian: apt-get install fortunes)");
    }
  }
  std::sort(files.begin(), files.end());
  std::string train, validation;
  long index = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string line, fortune;
    auto flush = [&] {
      if (!fortune.empty()) (index++ % 10 == c.split ? validation : train) += fortune;
      fortune.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%") flush();
      else fortune += line + "\n";
    }
    flush();
  }
  const std::size_t need = static_cast<std::size_t>(c.context) + 2;
  if (train.size() < need || validation.size() < need)
    throw std::invalid_argument("--text: too little text (" + std::to_string(train.size()) +
                                " training and " + std::to_string(validation.size()) +
                                " validation bytes; at least " + std::to_string(need) + " each)");
  auto tokens = [](const std::string& s) {
    return torch::from_blob(const_cast<char*>(s.data()), {static_cast<int64_t>(s.size())},
                            torch::kUInt8)
        .to(torch::kInt64);
  };
  return {tokens(train), tokens(validation)};
}

/// One window of context + 1 tokens per entry of `starts`: inputs and next-token targets.
std::pair<torch::Tensor, torch::Tensor> windows(const torch::Tensor& tokens,
                                                const torch::Tensor& starts, int context) {
  const torch::Tensor index = starts.unsqueeze(1) + torch::arange(context + 1).unsqueeze(0);
  const torch::Tensor w = tokens.index_select(0, index.flatten()).view({starts.size(0), -1});
  return {w.slice(1, 0, context), w.slice(1, 1, context + 1)};
}

/// Training batch `step`: random windows, the same for every run of one seed.
std::pair<torch::Tensor, torch::Tensor> train_batch(const Text& t, const Config& c, int step) {
  const torch::Tensor starts =
      torch::randint(t.train.size(0) - c.context - 1, {c.batch},
                     at::detail::createCPUGenerator(1000003ULL * c.seed + step));
  return windows(t.train, starts, c.context);
}

// ---- the model --------------------------------------------------------------------------------

struct RMSNormImpl : torch::nn::Module {
  torch::Tensor gain;
  explicit RMSNormImpl(int64_t width) { gain = register_parameter("gain", torch::ones({width})); }
  torch::Tensor forward(const torch::Tensor& x) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * gain;
  }
};
TORCH_MODULE(RMSNorm);

struct BlockImpl : torch::nn::Module {
  int64_t width, heads;
  RMSNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, up{nullptr}, down{nullptr};
  torch::Tensor max_logits;  // each head's largest attention logit since the step began
  BlockImpl(int64_t width_, int64_t heads_) : width(width_), heads(heads_) {
    auto linear = [](int64_t in, int64_t out) {
      return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
    };
    norm1 = register_module("norm1", RMSNorm(width));
    qkv = register_module("qkv", linear(width, 3 * width));
    proj = register_module("proj", linear(width, width));
    norm2 = register_module("norm2", RMSNorm(width));
    up = register_module("up", linear(width, 4 * width));
    down = register_module("down", linear(4 * width, width));
  }
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& future) {
    const int64_t b = x.size(0), t = x.size(1), d = width / heads;
    auto parts = qkv(norm1(x)).view({b, t, 3, heads, d}).permute({2, 0, 3, 1, 4});
    torch::Tensor scores = torch::matmul(parts[0], parts[1].transpose(-2, -1)) / std::sqrt(double(d));
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
    const torch::Tensor m = scores.detach().amax({0, 2, 3});  // per head, masked out left out
    max_logits = max_logits.defined() ? torch::maximum(max_logits, m) : m;  // over micro-batches
    const torch::Tensor attended = torch::matmul(scores.softmax(-1), parts[2]);
    x = x + proj(attended.transpose(1, 2).reshape({b, t, width}));
    return x + down(torch::gelu(up(norm2(x))));
  }
};
TORCH_MODULE(Block);

struct GptImpl : torch::nn::Module {
  torch::nn::Embedding token_embed{nullptr}, position_embed{nullptr};
  torch::nn::ModuleList blocks;
  RMSNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
  torch::Tensor future;  // the causal mask: true above the diagonal, made once
  explicit GptImpl(const Config& c)
      : future(torch::ones({c.context, c.context}, torch::kBool).triu(1)) {
    token_embed = register_module("token_embed", torch::nn::Embedding(256, c.width));
    position_embed = register_module("position_embed", torch::nn::Embedding(c.context, c.width));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int l = 0; l < c.layers; ++l) blocks->push_back(Block(c.width, c.heads));
    norm = register_module("norm", RMSNorm(c.width));
    head = register_module("head", torch::nn::Linear(torch::nn::LinearOptions(c.width, 256).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {
    const int64_t t = tokens.size(1);
    const torch::Tensor mask = future.slice(0, 0, t).slice(1, 0, t);
    torch::Tensor x = token_embed(tokens) + position_embed(torch::arange(t));
    for (const auto& block : *blocks) x = block->as<Block>()->forward(x, mask);
    return head(norm(x));
  }
};
TORCH_MODULE(Gpt);

/// The largest attention logit of the last forward pass, over every block and head.
double largest_logit(Gpt& model) {
  double m = -std::numeric_limits<double>::infinity();
  for (const auto& block : *model->blocks)
    m = std::max(m, block->as<Block>()->max_logits.max().item<double>());
  return m;
}

torch::Tensor loss_of(Gpt& model, const std::pair<torch::Tensor, torch::Tensor>& batch) {
  const torch::Tensor logits = model->forward(batch.first);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, 256}), batch.second.reshape({-1}));
}

/// Mean loss over `eval_batches` fixed windows spread evenly over the validation text.
double validation_loss(Gpt& model, const Text& t, const Config& c) {
  torch::NoGradGuard no_grad;
  const int64_t last = t.validation.size(0) - c.context - 1;
  const torch::Tensor starts =
      torch::linspace(0, last, c.batch * c.eval_batches, torch::kFloat64).to(torch::kInt64);
  double sum = 0;
  for (int b = 0; b < c.eval_batches; ++b)
    sum += loss_of(model, windows(t.validation, starts.slice(0, b * c.batch, (b + 1) * c.batch),
                                  c.context))
               .item<double>();
  return sum / c.eval_batches;
}

// ---- the optimizers ---------------------------------------------------------------------------

/// Linear warm-up over the first `warmup` steps, then cosine decay to zero at `total`, applied
/// to every group's peak rate (LibTorch's LRScheduler interface).
class WarmupCosine : public torch::optim::LRScheduler {
 public:
  WarmupCosine(torch::optim::Optimizer& opt, double peak, int warmup, int total, int done = 0)
      : LRScheduler(opt), groups_(opt.param_groups().size()), peak_(peak), warmup_(warmup), total_(total) {
    step_count_ = static_cast<unsigned>(done);
    set_rates(opt);
  }
  /// The rate factor of step `s`.
  double factor(int s) const {
    if (s < warmup_) return (s + 1.0) / warmup_;
    return 0.5 * (1 + std::cos(std::numbers::pi * (s - warmup_) / std::max(1, total_ - warmup_)));
  }

 private:
  // LRScheduler::step() calls this after step step_count_, for the rate of the next one.
  std::vector<double> get_lrs() override {
    return std::vector<double>(groups_, peak_ * factor(static_cast<int>(step_count_) + 1));
  }
  void set_rates(torch::optim::Optimizer& opt) {  // the rate of the first step
    for (auto& g : opt.param_groups()) g.options().set_lr(peak_ * factor(static_cast<int>(step_count_)));
  }
  std::size_t groups_;
  double peak_;
  int warmup_, total_;
};

/// Muon for the hidden matrices, AdamW for embeddings, head and gains, one peak rate for both
/// (Moonlight's transfer: Muon's update scaled to AdamW's RMS, 0.2 sqrt(max(rows, cols))).
muon::libtorch::Routing muon_routing(Gpt& model, const Config& c, double lr) {
  muon::libtorch::RoutingOptions r;
  r.options.muon.lr = lr;
  r.options.muon.weight_decay = c.weight_decay;
  r.options.muon.scale = muon::ScaleMode::match_rms_adamw;
  r.options.adamw.lr = lr;
  r.options.adamw.beta2 = 0.95;
  r.options.adamw.weight_decay = c.weight_decay;
  for (int l = 0; l < c.layers; ++l)
    r.layouts["blocks." + std::to_string(l) + ".qkv.weight"].split =
        muon::Split{0, {c.width, c.width, c.width}};
  return muon::libtorch::route(model->named_parameters(), r);
}

struct Run {
  Run(std::string optimizer_, double lr_) : optimizer(std::move(optimizer_)), lr(lr_) {}
  std::string optimizer;
  double lr;
  std::vector<int> steps;          // evaluation points
  std::vector<double> validation;  // validation loss there
  std::vector<double> seconds;     // training time up to there (evaluation left out)
  double step_seconds = 0;         // of it, in the optimizer's step()
  double entropy = 0;              // mean SVD entropy of the hidden matrices at the end
  double max_logit = 0;            // the largest attention logit of any training step
  bool replicas_identical = true;  // under mpiexec: every process ended on the same weights
  double final_loss() const { return validation.back(); }
};

Gpt fresh_model(const Config& c) {
  torch::manual_seed(c.seed);
  return Gpt(c);
}

double mean_hidden_entropy(Gpt& model) {
  double sum = 0;
  int n = 0;
  for (const auto& p : model->named_parameters()) {
    if (p.value().dim() != 2 || p.key().find("blocks.") != 0) continue;
    sum += muon::svd_entropy(muon::libtorch::view<const float>(p.value().detach(), p.key()));
    ++n;
  }
  return n ? sum / n : 0;
}

/// What runs around an optimizer's step(), where it needs more than step().
struct Hooks {
  std::function<void()> before_step;  // AdamW under mpiexec: average the gradients
  std::function<void()> after_step;   // Muon with --qk-clip: rescale the attention heads
};

/// Steps [from, to) of one run, evaluating every eval_every steps and at the end. Each step's
/// batch is split into (processes x micro-batches) equal shares; this process backpropagates
/// the mean loss of each of its shares, and the gradients are divided by the micro-batches
/// (the optimizer or before_step averages them over the processes).
void train(Gpt& model, torch::optim::Optimizer& opt, WarmupCosine& schedule, const Text& text,
           const Config& c, int from, int to, Run& run, const Hooks& hooks = {}) {
  const auto start = Clock::now();
  double trained = run.seconds.empty() ? 0 : run.seconds.back();
  auto evaluate = [&](int step) {
    run.steps.push_back(step);
    run.seconds.push_back(trained);
    run.validation.push_back(validation_loss(model, text, c));
  };
  if (from == 0) evaluate(0);
  for (int step = from; step < to; ++step) {
    const auto t0 = Clock::now();
    opt.zero_grad();
    for (const auto& block : *model->blocks) block->as<Block>()->max_logits = torch::Tensor();
    const auto batch = train_batch(text, c, step);
    const int shares = world.size * c.micro_batches;
    const int64_t per = c.batch / shares;
    double loss = 0;
    for (int k = 0; k < c.micro_batches; ++k) {
      const int64_t first = (int64_t(world.rank) * c.micro_batches + k) * per;
      const torch::Tensor share = loss_of(model, {batch.first.slice(0, first, first + per),
                                                  batch.second.slice(0, first, first + per)});
      share.backward();
      loss += share.item<double>();
    }
    if (c.micro_batches > 1)
      for (auto& p : model->parameters()) p.mutable_grad().mul_(1.0 / c.micro_batches);
    if (hooks.before_step) hooks.before_step();
    loss = over_ranks(loss) / shares;
    const auto t1 = Clock::now();
    opt.step();
    if (hooks.after_step) hooks.after_step();
    schedule.step();
    run.step_seconds += seconds_since(t1);
    run.max_logit = std::max(run.max_logit, over_ranks(largest_logit(model), true));
    trained += seconds_since(t0);
    if ((step + 1) % c.eval_every == 0 || step + 1 == c.steps) {
      evaluate(step + 1);
      if (!world.speaks()) continue;
      const double rate = (step + 1 - from) * double(c.batch) * c.context / seconds_since(start);
      std::fprintf(stderr, "  %-5s lr %-7.3g step %5d/%d  train %.3f  validation %.3f  max logit %5.1f  %6.0f tok/s  ETA %4.0f s\n",
                   run.optimizer.c_str(), run.lr, step + 1, c.steps, loss,
                   run.validation.back(), run.max_logit, rate,
                   (c.steps - step - 1) * double(c.batch) * c.context / rate);
    }
  }
}

/// Under mpiexec: whether every process holds the same bits in every parameter.
bool replicas_identical(Gpt& model) {
  std::uint64_t hash = 1469598103934665603ULL;  // FNV-1a over the parameters' bytes
  for (const auto& p : model->parameters()) {
    const auto* bytes = static_cast<const unsigned char*>(p.data_ptr());
    for (std::size_t i = 0; i < static_cast<std::size_t>(p.nbytes()); ++i)
      hash = (hash ^ bytes[i]) * 1099511628211ULL;
  }
  std::uint64_t low = hash, high = hash;
#if defined(MUON_EXAMPLE_MPI)
  if (world.parallel()) {
    MPI_Allreduce(MPI_IN_PLACE, &low, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &high, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
  }
#endif
  return low == high;
}

/// One run of `c.steps` from the seed's initial weights, with the optimizer `make(model,
/// hooks)` (which sets what runs around its step()).
template <class MakeOptimizer>
Run train_run(const Config& c, const Text& text, const std::string& name, double lr,
              MakeOptimizer make) {
  Gpt model = fresh_model(c);
  Hooks hooks;
  const std::unique_ptr<torch::optim::Optimizer> opt = make(model, hooks);
  WarmupCosine schedule(*opt, lr, static_cast<int>(c.warmup * c.steps), c.steps);
  Run run(name, lr);
  train(model, *opt, schedule, text, c, 0, c.steps, run, hooks);
  run.entropy = mean_hidden_entropy(model);
  run.replicas_identical = replicas_identical(model);
  return run;
}

/// QK-clip (--qk-clip TAU) on every block's attention: its fused QKV's query and key heads,
/// rescaled after each step from the logits of the step's forward passes (under mpiexec, the
/// largest over the processes).
template <class MuonOptimizer>
std::function<void()> qk_clip_after_step(Gpt& model, MuonOptimizer& opt, const Config& c) {
  if (c.qk_clip <= 0) return {};
  std::vector<std::pair<BlockImpl*, muon::QkClipId>> clips;
  for (const auto& module : *model->blocks) {
    BlockImpl* b = module->as<Block>();
    const auto heads = muon::AttentionHeads::contiguous(b->heads, b->width / b->heads, 0, b->width);
    clips.emplace_back(b, opt.add_qk_clip(b->qkv->weight, b->qkv->weight, heads, {c.qk_clip}));
  }
  return [&opt, clips] {
    for (const auto& [block, id] : clips) opt.clip_qk(id, block->max_logits);
  };
}

/// The Muon runs' optimizer: muon::libtorch::Muon, or under mpiexec its sharded placement over
/// MPI, which averages the processes' gradients in step() and keeps 1/N of the state on each.
std::unique_ptr<torch::optim::Optimizer> make_muon(Gpt& model, const Config& c, double lr, Hooks& hooks) {
#if defined(MUON_EXAMPLE_MPI)
  if (world.parallel()) {
    using Parallel = muon::libtorch::ShardedMuon<muon::MpiCommunicator>;
    auto opt = std::make_unique<Parallel>(
        muon_routing(model, c, lr),
        Parallel::Engine(muon::MpiCommunicator(MPI_COMM_WORLD), muon::ShardingStrategy::zero1));
    hooks.after_step = qk_clip_after_step(model, *opt, c);
    return opt;
  }
#endif
  auto opt = std::make_unique<muon::libtorch::Muon<float>>(muon_routing(model, c, lr));
  hooks.after_step = qk_clip_after_step(model, *opt, c);
  return opt;
}

/// Under mpiexec, the AdamW runs' gradients: summed over the processes (one MPI_Allreduce per
/// parameter) and divided by their number, as the sharded optimizer does for the Muon runs.
void average_gradients([[maybe_unused]] Gpt& model) {
#if defined(MUON_EXAMPLE_MPI)
  for (auto& p : model->parameters()) {
    torch::Tensor g = p.mutable_grad();
    MPI_Allreduce(MPI_IN_PLACE, g.data_ptr<float>(), static_cast<int>(g.numel()), MPI_FLOAT,
                  MPI_SUM, MPI_COMM_WORLD);
    g.mul_(1.0f / static_cast<float>(world.size));
  }
#endif
}

Run train_muon(const Config& c, const Text& text, double lr) {
  return train_run(c, text, "Muon", lr, [&](Gpt& model, Hooks& hooks) { return make_muon(model, c, lr, hooks); });
}

Run train_adamw(const Config& c, const Text& text, double lr) {
  return train_run(c, text, "AdamW", lr, [&](Gpt& model, Hooks& hooks) -> std::unique_ptr<torch::optim::Optimizer> {
    if (world.parallel()) hooks.before_step = [&model] { average_gradients(model); };
    return std::make_unique<torch::optim::AdamW>(
        model->parameters(),
        torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).weight_decay(c.weight_decay));
  });
}

/// The Muon run again, saved with torch::save halfway and resumed in a fresh model and
/// optimizer from the file: true when the resumed run ends on the same bits.
bool resume_is_exact(const Config& c, const Text& text, double lr) {
  const int half = c.steps / 2, warmup = static_cast<int>(c.warmup * c.steps);
  Gpt model = fresh_model(c);
  Hooks hooks;
  const auto opt = make_muon(model, c, lr, hooks);
  WarmupCosine schedule(*opt, lr, warmup, c.steps);
  Run run("Muon", lr), unused = run;
  train(model, *opt, schedule, text, c, 0, half, run, hooks);
  std::stringstream checkpoint;  // a file in a real program: torch::save(*opt, "opt.pt")
  torch::save(*opt, checkpoint);  // under mpiexec: each process its own part of the state
  std::vector<torch::Tensor> weights;
  for (const auto& p : model->parameters()) weights.push_back(p.detach().clone());
  train(model, *opt, schedule, text, c, half, c.steps, run, hooks);

  Config other = c;  // other initial weights, overwritten by the saved ones
  other.seed = c.seed + 1;
  Gpt resumed = fresh_model(other);
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < weights.size(); ++i) resumed->parameters()[i].copy_(weights[i]);
  }
  Hooks hooks2;
  const auto opt2 = make_muon(resumed, c, lr, hooks2);
  torch::load(*opt2, checkpoint);
  WarmupCosine schedule2(*opt2, lr, warmup, c.steps, half);
  train(resumed, *opt2, schedule2, text, c, half, c.steps, unused, hooks2);
  bool same = true;
  for (std::size_t i = 0; i < weights.size(); ++i)
    same = same && torch::equal(resumed->parameters()[i], model->parameters()[i]);
  return over_ranks(same ? 0 : 1) == 0;  // on every process
}

const Run& best_of(const std::vector<Run>& runs, const std::string& optimizer) {
  const Run* best = nullptr;
  for (const Run& r : runs)
    if (r.optimizer == optimizer && (!best || r.final_loss() < best->final_loss())) best = &r;
  return *best;
}

/// The first evaluation point at which `run` is at or below `target`, or -1.
int first_below(const Run& run, double target) {
  for (std::size_t i = 0; i < run.steps.size(); ++i)
    if (run.validation[i] <= target) return static_cast<int>(i);
  return -1;
}

void write_csv(const std::string& path, const std::vector<Run>& runs) {
  std::ofstream out(path);
  out << "optimizer,lr,step,validation_loss,seconds\n";
  for (const Run& r : runs)
    for (std::size_t i = 0; i < r.steps.size(); ++i)
      out << r.optimizer << ',' << r.lr << ',' << r.steps[i] << ',' << std::setprecision(17)
          << r.validation[i] << std::setprecision(6) << ','
          << r.seconds[i] << '\n';
  if (!out) throw std::runtime_error("--csv: cannot write '" + path + "'");
}

/// MPI for the process's life, when mpiexec started it.
struct MpiSession {
  bool started = false;
  MpiSession(int& argc, char**& argv) {
    if (!launched_by_mpiexec()) return;
#if defined(MUON_EXAMPLE_MPI)
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world.size);
    started = true;
#else
    (void)argc, (void)argv;
    throw std::runtime_error("started by mpiexec, but built without MPI (Debian: libopenmpi-dev; "
                             "then configure again)");
#endif
  }
  ~MpiSession() {
#if defined(MUON_EXAMPLE_MPI)
    if (started) MPI_Finalize();
#endif
  }
  /// One process failed: stop them all (the others would wait in a collective forever).
  void abort() const {
#if defined(MUON_EXAMPLE_MPI)
    if (started && world.parallel()) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
  }
};

}  // namespace

int main(int argc, char** argv) {
  Config c;
  CLI::App app{"A small GPT on English text: Muon + AdamW against AdamW alone"};
  app.add_option("--text", c.text, "fortune files or directories of them")->capture_default_str();
  app.add_option("--steps", c.steps, "training steps of every run")->capture_default_str()->check(CLI::Range(2, 1 << 24));
  app.add_option("--width", c.width, "model width")->capture_default_str()->check(CLI::Range(8, 1 << 14));
  app.add_option("--layers", c.layers, "transformer blocks")->capture_default_str()->check(CLI::Range(1, 64));
  app.add_option("--heads", c.heads, "attention heads (divide the width)")->capture_default_str()->check(CLI::Range(1, 256));
  app.add_option("--context", c.context, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 14));
  app.add_option("--batch", c.batch, "sequences per step")->capture_default_str()->check(CLI::Range(1, 1 << 14));
  app.add_option("--warmup", c.warmup, "share of the steps warming up")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  app.add_option("--weight-decay", c.weight_decay, "decoupled weight decay of both optimizers")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--qk-clip", c.qk_clip, "Muon runs: rescale the query and key heads whose attention logits pass this (QK-clip; 0: off)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--muon-lr", c.muon_lr, "peak rates to sweep for Muon (+ AdamW on the rest)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--adamw-lr", c.adamw_lr, "peak rates to sweep for AdamW alone")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--eval-every", c.eval_every, "steps between validation losses")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--eval-batches", c.eval_batches, "batches of the validation loss")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--seed", c.seed, "initial weights and batch order")->capture_default_str();
  app.add_option("--split", c.split, "which tenth of the fortunes is held out")->capture_default_str()->check(CLI::Range(0, 9));
  app.add_option("--micro-batches", c.micro_batches, "shares of each batch a process backpropagates one after the other (gradient accumulation)")->capture_default_str()->check(CLI::Range(1, 1 << 14));
  app.add_option("--threads", c.threads, "LibTorch's threads per process (0: its default)")->capture_default_str()->check(CLI::Range(0, 1024));
  app.add_option("--csv", c.csv, "write every run's validation curve here");
  app.add_flag("--check-resume", c.check_resume, "also check that a Muon run saved and resumed halfway ends on the same bits");
  CLI11_PARSE(app, argc, argv);
  std::unique_ptr<MpiSession> mpi;
  try {
    mpi = std::make_unique<MpiSession>(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt_muon_vs_adamw: %s\n", e.what());
    return 2;
  }
  if (!world.speaks() && std::freopen("/dev/null", "w", stdout) == nullptr) return 2;  // one reports
  if (c.threads > 0) torch::set_num_threads(c.threads);
  if (c.batch % (world.size * c.micro_batches) != 0) {
    std::fprintf(stderr, "--batch: %d sequences do not split into %d processes x %d micro-batches\n",
                 c.batch, world.size, c.micro_batches);
    return 2;
  }
  if (c.width % c.heads != 0) {
    std::fprintf(stderr, "--heads: %d does not divide --width %d\n", c.heads, c.width);
    return 2;
  }
  if (c.muon_lr.empty() || c.adamw_lr.empty()) {
    std::fprintf(stderr, "--muon-lr and --adamw-lr: at least one rate each\n");
    return 2;
  }
  try {
    const Text text = read_text(c);
    std::printf("text: %lld training and %lld validation bytes; model: width %d, %d layers, %d heads, "
                "context %d, batch %d (%d process%s x %d micro-batch%s), %d steps\n",
                static_cast<long long>(text.train.size(0)), static_cast<long long>(text.validation.size(0)),
                c.width, c.layers, c.heads, c.context, c.batch, world.size, world.size > 1 ? "es" : "",
                c.micro_batches, c.micro_batches > 1 ? "es" : "", c.steps);
    {
      Gpt model = fresh_model(c);
      std::printf("%s\n", muon_routing(model, c, c.muon_lr[0]).table().c_str());
    }
    std::vector<Run> runs;
    for (double lr : c.adamw_lr) runs.push_back(train_adamw(c, text, lr));
    for (double lr : c.muon_lr) runs.push_back(train_muon(c, text, lr));
    if (!c.csv.empty() && world.speaks()) write_csv(c.csv, runs);

    std::printf("optimizer  peak lr   final validation loss   train s   in step() s   SVD entropy   max logit\n");
    for (const Run& r : runs)
      std::printf("%-9s  %-8.3g  %21.4f   %7.1f   %11.1f   %11.3f   %9.1f\n", r.optimizer.c_str(), r.lr,
                  r.final_loss(), r.seconds.back(), r.step_seconds, r.entropy, r.max_logit);
    const Run& adamw = best_of(runs, "AdamW");
    const Run& muon = best_of(runs, "Muon");
    const double target = adamw.final_loss();
    const int at = first_below(muon, target);
    std::printf("\nAdamW's best final validation loss: %.4f (lr %.3g, %d steps)\n", target, adamw.lr, c.steps);
    if (at < 0) {
      std::printf("steps to AdamW's loss: Muon (lr %.3g) does not reach it in %d steps (its final loss %.4f)\n",
                  muon.lr, c.steps, muon.final_loss());
    } else {
      std::printf("steps to AdamW's loss: Muon (lr %.3g) %d (%.0f%% of AdamW's), wall time %.1f s "
                  "against %.1f s\n",
                  muon.lr, muon.steps[at], 100.0 * muon.steps[at] / c.steps, muon.seconds[at],
                  adamw.seconds.back());
    }
    std::printf("SVD entropy of the hidden matrices at the end (mean): Muon %.3f, AdamW %.3f\n",
                muon.entropy, adamw.entropy);
    if (world.parallel()) {
      const bool identical = std::all_of(runs.begin(), runs.end(), [](const Run& r) { return r.replicas_identical; });
      std::printf("replicas: %s on %d processes\n",
                  identical ? "every run ended on the same weights" : "DIFFERENT weights", world.size);
      if (!identical) return 1;
    }
    if (c.check_resume) {
      const bool same = resume_is_exact(c, text, c.muon_lr[0]);
      std::printf("\nMuon resumed from a torch::save checkpoint at step %d: %s\n", c.steps / 2,
                  same ? "the same weights, bit for bit" : "DIFFERENT weights");
      if (!same) return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt_muon_vs_adamw: %s\n", e.what());
    mpi->abort();
    return 1;
  }
  return 0;
}
