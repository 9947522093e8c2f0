// muon in a LibTorch program: torch's autograd computes the gradients, muon updates the tensors
// in place through muon/adapters/libtorch.hpp (no copies). Muon takes the hidden weight
// matrices (fc1, fc2); AdamW, in the same muon optimizer, takes the embedding, the head and
// the biases. The same network trained with torch::optim::AdamW alone is printed beside it.
//
// The task: bags of 8 tokens (vocabulary 64) labelled by a random teacher network (10 classes).
#include <torch/torch.h>

#include <cstdio>
#include <muon/adapters/libtorch.hpp>
#include <muon/eigen.hpp>
#include <string>
#include <vector>

struct NetImpl : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, head{nullptr};
  NetImpl() {
    embed = register_module("embed", torch::nn::Embedding(64, 32));
    fc1 = register_module("fc1", torch::nn::Linear(32, 128));
    fc2 = register_module("fc2", torch::nn::Linear(128, 128));
    head = register_module("head", torch::nn::Linear(128, 10));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {
    torch::Tensor h = embed(tokens).mean(1);
    h = torch::relu(fc1(h));
    h = torch::relu(fc2(h));
    return head(h);
  }
};
TORCH_MODULE(Net);

int main() {
  torch::manual_seed(0);
  const torch::Tensor tokens = torch::randint(64, {8192, 8});
  torch::Tensor labels;
  {
    torch::NoGradGuard no_grad;
    labels = Net()->forward(tokens).argmax(1);  // a random teacher of the same architecture
  }
  torch::manual_seed(1);
  Net with_muon;
  torch::manual_seed(1);
  Net with_adamw;  // the same initial weights

  muon::GroupOptions options;
  options.muon.lr = 0.02;
  options.muon.weight_decay = 0.01;
  options.adamw.lr = 3e-3;
  muon::Optimizer<muon::EigenBackend, float> hybrid(options);
  std::vector<std::pair<torch::Tensor, void*>> grad_storage;  // to check autograd kept it
  for (const auto& item : with_muon->named_parameters()) {
    const torch::Tensor& p = item.value();
    const bool hidden = p.dim() == 2 && item.key().rfind("fc", 0) == 0;
    auto param = muon::libtorch::param<float>(p);
    auto grad = muon::libtorch::grad<float>(p);
    if (hidden)
      hybrid.add_muon(item.key(), param, grad);
    else
      hybrid.add_adamw(item.key(), param, grad);
    grad_storage.emplace_back(p, p.grad().data_ptr());
    std::printf("%-12s %-18s -> %s\n", item.key().c_str(), c10::str(p.sizes()).c_str(),
                hidden ? "Muon" : "AdamW");
  }
  torch::optim::AdamW adamw(with_adamw->parameters(),
                            torch::optim::AdamWOptions(3e-3).weight_decay(0.01));

  auto accuracy = [&](Net& net) {
    torch::NoGradGuard no_grad;
    return net->forward(tokens).argmax(1).eq(labels).to(torch::kFloat).mean().item<float>();
  };
  std::printf("\nstep   loss (Muon + AdamW)   loss (torch AdamW)\n");
  const int batch = 256, steps = 600;
  for (int step = 0; step <= steps; ++step) {
    const torch::Tensor idx = torch::randint(tokens.size(0), {batch});
    const torch::Tensor x = tokens.index_select(0, idx), y = labels.index_select(0, idx);

    with_muon->zero_grad(/*set_to_none=*/false);  // keep the storage muon views
    const torch::Tensor loss_muon = torch::nn::functional::cross_entropy(with_muon->forward(x), y);
    loss_muon.backward();
    hybrid.step();

    adamw.zero_grad();
    const torch::Tensor loss_adamw =
        torch::nn::functional::cross_entropy(with_adamw->forward(x), y);
    loss_adamw.backward();
    adamw.step();
    if (step % 100 == 0)
      std::printf("%4d   %19.4f   %18.4f\n", step, loss_muon.item<float>(),
                  loss_adamw.item<float>());
  }
  std::printf("\ntraining accuracy: Muon + AdamW %.3f, torch AdamW %.3f\n", accuracy(with_muon),
              accuracy(with_adamw));
  for (const auto& [p, storage] : grad_storage)
    if (p.grad().data_ptr() != storage) {
      std::fprintf(stderr, "a gradient was reallocated: muon's view of it is stale\n");
      return 1;
    }
  return 0;
}
