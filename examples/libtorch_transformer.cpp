// muon in a LibTorch program through LibTorch's own optimizer interface: a small transformer
// (token and position embeddings, two blocks of causal attention with a fused QKV matrix and
// an MLP, a head) trained with muon::libtorch::Muon under a cosine learning-rate schedule,
// beside the same model trained with torch::optim::AdamW. Halfway through, the Muon run is
// saved with torch::save and resumed from the file; the resumed run must end on the same bits.
//
// The task: sequences of 16 tokens whose second half repeats the first, so the second half
// can be predicted by attending back 8 positions; the loss is measured on that half only.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <muon/adapters/libtorch_optimizer.hpp>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

constexpr int64_t kVocab = 64, kWidth = 64, kHeads = 4, kLength = 16, kBatch = 32;

struct BlockImpl : torch::nn::Module {
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, up{nullptr}, down{nullptr};
  BlockImpl() {
    norm1 = register_module("norm1", torch::nn::LayerNorm(std::vector<int64_t>{kWidth}));
    qkv = register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(kWidth, 3 * kWidth).bias(false)));
    proj = register_module("proj", torch::nn::Linear(kWidth, kWidth));
    norm2 = register_module("norm2", torch::nn::LayerNorm(std::vector<int64_t>{kWidth}));
    up = register_module("up", torch::nn::Linear(kWidth, 4 * kWidth));
    down = register_module("down", torch::nn::Linear(4 * kWidth, kWidth));
  }
  torch::Tensor forward(torch::Tensor x) {
    const int64_t b = x.size(0), t = x.size(1), d = kWidth / kHeads;
    auto parts = qkv(norm1(x)).view({b, t, 3, kHeads, d}).permute({2, 0, 3, 1, 4});
    torch::Tensor scores = torch::matmul(parts[0], parts[1].transpose(-2, -1)) / std::sqrt(double(d));
    const torch::Tensor future = torch::ones({t, t}, torch::kBool).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
    const torch::Tensor attended = torch::matmul(scores.softmax(-1), parts[2]);
    x = x + proj(attended.transpose(1, 2).reshape({b, t, kWidth}));
    return x + down(torch::gelu(up(norm2(x))));
  }
};
TORCH_MODULE(Block);

struct TransformerImpl : torch::nn::Module {
  torch::nn::Embedding embed{nullptr}, position{nullptr};
  torch::nn::ModuleList blocks;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
  TransformerImpl() {
    embed = register_module("embed", torch::nn::Embedding(kVocab, kWidth));
    position = register_module("position_embed", torch::nn::Embedding(kLength, kWidth));
    blocks = register_module("blocks", torch::nn::ModuleList(Block(), Block()));
    norm = register_module("norm", torch::nn::LayerNorm(std::vector<int64_t>{kWidth}));
    head = register_module("head", torch::nn::Linear(kWidth, kVocab));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {
    torch::Tensor x = embed(tokens) + position(torch::arange(tokens.size(1)));
    for (const auto& block : *blocks) x = block->as<Block>()->forward(x);
    return head(norm(x));
  }
};
TORCH_MODULE(Transformer);

/// Cosine decay from each group's starting rate to zero over `total` steps, by LibTorch's own
/// LRScheduler interface; `done` steps already taken (a resumed run).
class CosineLR : public torch::optim::LRScheduler {
 public:
  CosineLR(torch::optim::Optimizer& opt, unsigned total, unsigned done = 0)
      : LRScheduler(opt), total_(total) {
    for (const auto& g : opt.param_groups()) base_.push_back(g.options().get_lr());
    if (done > 0)  // the rates at that point came from factor(done - 1): recover the first
      for (double& lr : base_) lr /= factor(done - 1);
    step_count_ = done;
  }

 private:
  double factor(unsigned step) const {
    return 0.5 * (1 + std::cos(std::numbers::pi * step / total_));
  }
  std::vector<double> get_lrs() override {
    std::vector<double> out;
    for (double lr : base_) out.push_back(lr * factor(step_count_));
    return out;
  }
  unsigned total_;
  std::vector<double> base_;
};

/// Batch `step` of the copy task (the same batches for every run).
std::pair<torch::Tensor, torch::Tensor> batch(int step) {
  const torch::Tensor first =
      torch::randint(kVocab, {kBatch, kLength / 2}, at::detail::createCPUGenerator(step));
  const torch::Tensor tokens = torch::cat({first, first}, 1);
  return {tokens.slice(1, 0, kLength - 1), tokens.slice(1, 1, kLength)};
}

/// Cross-entropy on the positions whose next token repeats the first half.
torch::Tensor loss_of(Transformer& model, int step) {
  const auto [inputs, targets] = batch(step);
  const torch::Tensor logits = model->forward(inputs).slice(1, kLength / 2 - 1);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}),
                                              targets.slice(1, kLength / 2 - 1).reshape({-1}));
}

/// Steps [from, to) of a run, printing the loss every 50 steps when `losses` is given.
void train(Transformer& model, torch::optim::Optimizer& opt, torch::optim::LRScheduler& lr,
           int from, int to, std::vector<float>* losses = nullptr) {
  for (int step = from; step < to; ++step) {
    opt.zero_grad();
    const torch::Tensor loss = loss_of(model, step);
    loss.backward();
    opt.step();
    lr.step();
    if (losses && step % 50 == 0) losses->push_back(loss.item<float>());
  }
}

muon::libtorch::Routing routing(Transformer& model) {
  muon::libtorch::RoutingOptions r;
  r.options.muon.lr = 0.02;
  r.options.muon.weight_decay = 0.01;
  r.options.adamw.lr = 3e-3;
  r.options.adamw.weight_decay = 0.01;
  for (int b = 0; b < 2; ++b)  // Q, K and V orthogonalized as three matrices
    r.layouts["blocks." + std::to_string(b) + ".qkv.weight"].split =
        muon::Split{0, {kWidth, kWidth, kWidth}};
  return muon::libtorch::route(model->named_parameters(), r);
}

int main() {
  constexpr int kSteps = 400, kHalf = kSteps / 2;
  torch::manual_seed(0);
  Transformer model;
  torch::manual_seed(0);
  Transformer reference;  // the same initial weights, for torch::optim::AdamW

  const auto routed = routing(model);
  std::printf("%s\n", routed.table().c_str());
  muon::libtorch::Muon<float> opt(routed);
  CosineLR lr(opt, kSteps);
  std::vector<float> muon_losses, adamw_losses;
  train(model, opt, lr, 0, kHalf, &muon_losses);
  std::stringstream checkpoint;  // a file in a real program: torch::save(opt, "opt.pt")
  torch::save(opt, checkpoint);
  std::vector<torch::Tensor> weights;
  for (const auto& p : model->parameters()) weights.push_back(p.detach().clone());
  train(model, opt, lr, kHalf, kSteps, &muon_losses);

  torch::optim::AdamW adamw(reference->parameters(),
                            torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  CosineLR adamw_lr(adamw, kSteps);
  train(reference, adamw, adamw_lr, 0, kSteps, &adamw_losses);

  std::printf("step   loss (Muon + AdamW)   loss (torch AdamW)\n");
  for (std::size_t i = 0; i < muon_losses.size(); ++i)
    std::printf("%4zu   %19.4f   %18.4f\n", i * 50, muon_losses[i], adamw_losses[i]);
  std::printf("%4d   %19.4f   %18.4f\n", kSteps, loss_of(model, kSteps).item<float>(),
              loss_of(reference, kSteps).item<float>());

  // The second half again, from the checkpoint, in a fresh model and optimizer.
  torch::manual_seed(1);
  Transformer resumed;
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < weights.size(); ++i) resumed->parameters()[i].copy_(weights[i]);
  }
  muon::libtorch::Muon<float> opt2(routing(resumed));
  torch::load(opt2, checkpoint);
  CosineLR lr2(opt2, kSteps, kHalf);
  train(resumed, opt2, lr2, kHalf, kSteps);
  bool same = true;
  for (std::size_t i = 0; i < weights.size(); ++i)
    same = same && torch::equal(resumed->parameters()[i], model->parameters()[i]);
  std::printf("\nresumed from the checkpoint at step %d: %s\n", kHalf,
              same ? "the same weights, bit for bit" : "DIFFERENT weights");
  return same ? 0 : 1;
}
