// Per-layer profiles for the planner (measure.h).

#include "dtrain/plan/measure.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/memory.h"

namespace dtrain::plan {

namespace pipeline = parallel::pipeline;

std::vector<LayerProfile> measure_layers(const std::vector<pipeline::Layer>& layers,
                                         const torch::Tensor& sample,
                                         const pipeline::LayerTimingOptions& options) {
  DTRAIN_CHECK_ARG(!layers.empty(), "measure_layers: the model has no layers");
  DTRAIN_CHECK_ARG(sample.defined() && sample.dim() >= 1 && sample.size(0) >= 1,
                   "measure_layers: the sample microbatch must have at least one sample");
  const std::vector<double> totals = pipeline::measure_layer_times(layers, {sample}, options);
  const std::vector<double> parameters = pipeline::parameter_counts(layers);
  const auto samples = static_cast<double>(sample.size(0));
  std::vector<LayerProfile> out(layers.size());
  torch::Tensor x = sample.detach();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    torch::nn::AnyModule module = layers[i].module;  // shared; forward() is not const
    std::vector<double> runs;
    std::size_t kept = 0;
    torch::Tensor output;
    for (int r = 0; r < options.warmup_runs + options.timed_runs; ++r) {
      torch::Tensor input = x.is_floating_point() ? x.detach().requires_grad_(true) : x.detach();
      output = torch::Tensor();
      const std::size_t before = heap_bytes_in_use();
      const auto run = [&] { output = module.forward(input); };
      double seconds = 0.0;
      if (options.timer) {
        seconds = options.timer(static_cast<int>(i), run);
      } else {
        const auto start = std::chrono::steady_clock::now();
        run();
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
      const std::size_t after = heap_bytes_in_use();
      DTRAIN_CHECK_ARG(output.defined(), "layer ", i, " (", layers[i].name,
                       ") was never run: the timer must call the function it is given");
      if (r < options.warmup_runs) continue;
      runs.push_back(seconds);
      kept = std::max(kept, after > before ? after - before : 0);
    }
    std::nth_element(runs.begin(), runs.begin() + static_cast<std::ptrdiff_t>(runs.size() / 2),
                     runs.end());
    const double forward = runs[runs.size() / 2];
    LayerProfile& p = out[i];
    p.name = layers[i].name;
    p.parameters = static_cast<std::int64_t>(parameters[i]);
    p.forward_seconds = forward / samples;
    p.backward_seconds = std::max(0.0, totals[i] - forward) / samples;
    p.output_bytes = static_cast<std::int64_t>(output.numel() * output.element_size() / samples);
    p.saved_bytes = static_cast<std::int64_t>(static_cast<double>(kept) / samples);
    x = output.detach();
  }
  return out;
}

}  // namespace dtrain::plan
