#pragma once
// Measuring a model's layers for the planner's profile (planner.h).

#include <torch/types.h>

#include <vector>

#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/plan/planner.h"

namespace dtrain::plan {

/// Per-sample profiles of `layers` on one microbatch `sample` (its first
/// dimension counts the samples), on this rank's threads, at tp = 1:
///  * forward_seconds: the median of timed forwards (with autograd
///    recording, as in training; options.timer, when set, times them as it
///    times measure_layer_times' runs); backward_seconds: the layer's
///    forward+backward time (pipeline::measure_layer_times, with the same
///    options) minus its forward;
///  * output_bytes: the layer's output;
///  * saved_bytes: the heap bytes a forward keeps until its backward, the
///    output included (heap_bytes_in_use() (dtrain/memory.h) after the forward, output and
///    graph alive, minus before): what the layer adds to a stored
///    microbatch. CPU tensors only; on a GPU this counts host memory.
///  * parameters: pipeline::parameter_counts.
/// Each divided by the sample count. tensor_parallel, tp_all_reduces and
/// replicated_saved_bytes are left for the caller, who knows the model.
/// BatchNorm's running statistics and the random generator move as in a
/// training step: profile a model that is not training.
/// Throws InvalidArgument if there are no layers or the sample is empty.
std::vector<LayerProfile> measure_layers(
    const std::vector<parallel::pipeline::Layer>& layers, const torch::Tensor& sample,
    const parallel::pipeline::LayerTimingOptions& options = {});

}  // namespace dtrain::plan
