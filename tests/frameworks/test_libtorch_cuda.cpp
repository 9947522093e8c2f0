// muon::libtorch::CudaMuon on CUDA tensors, from a .cpp compiled by the C++ compiler: the same
// model trained on the GPU and on the CPU steps to the same weights within float rounding,
// on torch's own stream; a gradient set to None sits its step out. Built where LibTorch is a
// CUDA build; exit code 77 (skipped) without a GPU.
#include <torch/torch.h>

#include <cstdio>
#include <muon/adapters/libtorch_cuda.hpp>

namespace {

struct NetImpl : torch::nn::Module {
  torch::nn::Linear hidden{nullptr}, head{nullptr};
  NetImpl() {
    hidden = register_module("hidden", torch::nn::Linear(32, 64));
    head = register_module("head", torch::nn::Linear(64, 8));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::tanh(hidden(x))); }
};
TORCH_MODULE(Net);

torch::Tensor loss_of(Net& net, int step, torch::Device device) {
  torch::manual_seed(step);
  const torch::Tensor x = torch::randn({16, 32}), y = torch::randint(8, {16});
  return torch::nn::functional::cross_entropy(net->forward(x.to(device)), y.to(device));
}

int failures = 0;
void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok    " : "FAILED", what);
  failures += ok ? 0 : 1;
}

}  // namespace

int main() {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device visible: skipped\n");
    return 77;
  }
  torch::manual_seed(0);
  Net cpu, gpu;
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < cpu->parameters().size(); ++i)
      gpu->parameters()[i].copy_(cpu->parameters()[i]);
  }
  gpu->to(torch::kCUDA);
  muon::libtorch::Muon<float> on_cpu(muon::libtorch::route(cpu->named_parameters()));
  muon::libtorch::CudaMuon<float> on_gpu(muon::libtorch::route(gpu->named_parameters()));
  for (int step = 0; step < 3; ++step) {
    for (auto [net, opt, device] :
         {std::tuple{&cpu, static_cast<torch::optim::Optimizer*>(&on_cpu), torch::Device(torch::kCPU)},
          std::tuple{&gpu, static_cast<torch::optim::Optimizer*>(&on_gpu), torch::Device(torch::kCUDA)}}) {
      opt->zero_grad();
      loss_of(*net, step, device).backward();
      opt->step();
    }
  }
  double diff = 0;
  for (std::size_t i = 0; i < cpu->parameters().size(); ++i)
    diff = std::max(diff, (gpu->parameters()[i].cpu() - cpu->parameters()[i]).abs().max().item<double>());
  check(diff < 1e-4, "GPU steps equal the CPU steps within float rounding");
  gpu->head->bias.mutable_grad().reset();
  const torch::Tensor bias = gpu->head->bias.detach().clone();
  on_gpu.step();
  check(torch::equal(gpu->head->bias, bias), "a gradient set to None sits its step out");
  return failures == 0 ? 0 : 1;
}
