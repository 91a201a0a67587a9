#pragma once
// ResNet models for the examples, the benchmarks and the reference trainer.
//
// Two layouts, as in the papers:
//  * ImageNet (He et al. 2015, "Deep Residual Learning", table 1): a 7x7
//    stride-2 stem with 64 channels, 3x3 stride-2 max-pool, 4 stages of
//    BasicBlocks (ResNet-18/34) or Bottlenecks (ResNet-50) with 64/128/256/512
//    base channels, global average pool, one linear layer. A stage that
//    changes the shape starts with a projection shortcut (1x1 conv + BN,
//    "option B"); the stride sits on the 3x3 conv of a Bottleneck
//    (torchvision's "v1.5"). ResNet-18 with 1000 classes has 11,689,512
//    parameters.
//  * CIFAR (same paper, section 4.2): a 3x3 stem with 16 channels, 3 stages of
//    n BasicBlocks with 16/32/64 channels (depth 6n+2: ResNet-20/32/56),
//    global average pool, one linear layer. Shortcuts are "option A" by
//    default, as in the paper: identity, subsampled by 2 and zero-padded with
//    the new channels where the shape changes, so they add no parameters
//    (ResNet-20 with 3 input channels and 10 classes: 269,722 parameters).
//    ResNetOptions::shortcut = kProjection selects option B instead.
//
// Both take any input channel count and spatial size that survives the
// downsampling (ImageNet layout: 32x; CIFAR layout: 4x); the final pool is
// adaptive, so e.g. ResNet-20 runs on 1x28x28 images.
//
// Initialisation (He et al. 2015, "Delving Deep into Rectifiers"): conv
// weights Kaiming normal with fan_out and ReLU gain, BatchNorm weight 1 and
// bias 0, the linear layer LibTorch's default. With zero_init_residual the
// last BatchNorm of every residual branch starts with weight 0, so each block
// starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
//
// Modules are ordinary torch::nn modules: not thread-safe, like LibTorch's.

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <torch/nn/modules/container/any.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/pipeline/partition.h"

namespace dtrain::resnet {

/// How a residual block's shortcut matches a change of shape.
enum class Shortcut {
  kZeroPad,     ///< option A: identity, stride-2 subsampling, zero-padded channels
  kProjection,  ///< option B: 1x1 conv (with the stride) + BatchNorm
};

enum class BlockKind {
  kBasic,       ///< two 3x3 convs; expansion 1
  kBottleneck,  ///< 1x1 reduce, 3x3, 1x1 expand (x4)
};

enum class Layout {
  kImageNet,  ///< 7x7/2 stem + max-pool, stages of 64/128/256/512 base channels
  kCifar,     ///< 3x3 stem, stages of 16/32/64 channels
};

/// Makes the normalization layer of `channels` channels (input [N, C, H, W]).
using NormFactory = std::function<torch::nn::AnyModule(std::int64_t channels)>;

/// torch::nn::BatchNorm2d (the default NormFactory).
torch::nn::AnyModule batch_norm_2d(std::int64_t channels);

/// dtrain::parallel::SyncBatchNorm over `comm` (its own communicator over the
/// data-parallel ranks; see sync_batch_norm.h): statistics of the whole
/// global batch. Use it at every world size, 1 included: a 1-rank run then
/// computes exactly as N ranks do, while BatchNorm2d rounds differently and
/// makes 1-rank and N-rank runs drift apart (docs/ddp.md, SyncBatchNorm).
NormFactory sync_batch_norm_2d(std::shared_ptr<collectives::Communicator> comm);

struct ResNetOptions {
  Layout layout = Layout::kCifar;
  BlockKind block = BlockKind::kBasic;
  /// Blocks per stage: 4 entries for kImageNet, 3 for kCifar.
  std::vector<int> blocks_per_stage = {3, 3, 3};
  std::int64_t in_channels = 3;
  std::int64_t num_classes = 10;
  /// Shortcut where a block changes shape. kCifar defaults to kZeroPad (the
  /// paper's CIFAR models); kImageNet requires kProjection.
  Shortcut shortcut = Shortcut::kZeroPad;
  /// Start the last BatchNorm of each residual branch at weight 0.
  bool zero_init_residual = false;
  /// Normalization layers (empty: BatchNorm2d). For data parallelism with
  /// synchronized statistics, return a dtrain::parallel::SyncBatchNorm.
  NormFactory norm;

  /// Throws InvalidArgument naming the first bad field.
  void validate() const;
};

/// conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.
class BasicBlockImpl : public torch::nn::Module {
 public:
  BasicBlockImpl(std::int64_t in_channels, std::int64_t out_channels, std::int64_t stride,
                 Shortcut shortcut, const NormFactory& norm = batch_norm_2d);
  torch::Tensor forward(const torch::Tensor& x);
  /// The branch's last BatchNorm (zero-initialised by zero_init_residual).
  std::shared_ptr<torch::nn::Module> last_bn() const { return bn2_.ptr(); }

 private:
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr};
  torch::nn::AnyModule bn1_, bn2_;
  torch::nn::Sequential projection_{nullptr};  // set for option B when the shape changes
  std::int64_t pad_channels_ = 0;              // option A: channels to add
  std::int64_t stride_ = 1;
};
TORCH_MODULE(BasicBlock);

/// 1x1 reduce-BN-ReLU, 3x3 (stride)-BN-ReLU, 1x1 expand (x4)-BN, plus the
/// shortcut (projection when the shape changes), then ReLU.
class BottleneckImpl : public torch::nn::Module {
 public:
  static constexpr std::int64_t kExpansion = 4;
  BottleneckImpl(std::int64_t in_channels, std::int64_t base_channels, std::int64_t stride,
                 const NormFactory& norm = batch_norm_2d);
  torch::Tensor forward(const torch::Tensor& x);
  std::shared_ptr<torch::nn::Module> last_bn() const { return bn3_.ptr(); }

 private:
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv3_{nullptr};
  torch::nn::AnyModule bn1_, bn2_, bn3_;
  torch::nn::Sequential projection_{nullptr};
};
TORCH_MODULE(Bottleneck);

/// stem -> stages -> global average pool -> flatten -> linear. forward takes
/// N x in_channels x H x W and returns N x num_classes logits.
class ResNetImpl : public torch::nn::Module {
 public:
  explicit ResNetImpl(const ResNetOptions& options);
  torch::Tensor forward(const torch::Tensor& x);
  const ResNetOptions& options() const { return options_; }
  /// The model as a sequence of layers for pipeline parallelism
  /// (dtrain/parallel/pipeline/partition.h), sharing this model's modules:
  /// the stem's layers ("stem.0", "stem.1", ...), every residual block
  /// ("layer1.0", "layer1.1", ..., "layer3.2" for resnet20), "pool" (global
  /// average pool and flatten, no parameters) and "fc". Their parameter
  /// names are this module's own ("layer1.0.conv1.weight"), so a checkpoint
  /// of the whole model loads into any split and back; running them in
  /// order computes forward() with the same operations.
  std::vector<dtrain::parallel::pipeline::Layer> layers() const;

 private:
  void initialize_weights();

  ResNetOptions options_;
  torch::nn::Sequential stem_{nullptr};
  std::vector<torch::nn::Sequential> stages_;  // registered as layer1, layer2, ...
  torch::nn::Linear fc_{nullptr};
};
TORCH_MODULE(ResNet);

/// The names make_resnet accepts: resnet18, resnet34, resnet50 (ImageNet
/// layout) and resnet20, resnet32, resnet56 (CIFAR layout, option A).
std::vector<std::string> resnet_names();

/// The options of a named model; throws InvalidArgument listing the valid
/// names for an unknown one.
ResNetOptions resnet_options(const std::string& name, std::int64_t in_channels,
                             std::int64_t num_classes);

/// A freshly initialised model by name (see resnet_names()); throws
/// InvalidArgument listing the valid names for an unknown one.
ResNet make_resnet(const std::string& name, std::int64_t in_channels, std::int64_t num_classes,
                   bool zero_init_residual = false, NormFactory norm = {});

/// Number of trainable parameters (elements), e.g. 269,722 for resnet20 with
/// 3 input channels and 10 classes.
std::int64_t parameter_count(const torch::nn::Module& module);

}  // namespace dtrain::resnet
