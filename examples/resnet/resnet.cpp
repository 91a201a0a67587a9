#include "examples/resnet/resnet.h"

#include <torch/nn/functional/padding.h>
#include <torch/nn/functional/pooling.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/pooling.h>

#include <map>
#include <sstream>
#include <utility>

#include "dtrain/error.h"
#include "dtrain/parallel/sync_batch_norm.h"

namespace dtrain::resnet {
namespace {

namespace nn = torch::nn;

nn::Conv2d conv(std::int64_t in, std::int64_t out, std::int64_t kernel, std::int64_t stride) {
  return nn::Conv2d(
      nn::Conv2dOptions(in, out, kernel).stride(stride).padding(kernel / 2).bias(false));
}

nn::Sequential projection(std::int64_t in, std::int64_t out, std::int64_t stride,
                          const NormFactory& norm) {
  nn::Sequential seq(conv(in, out, 1, stride));
  seq->push_back(norm(out));
  return seq;
}

// Registers a normalization layer held as an AnyModule.
nn::AnyModule registered(nn::Module& parent, const std::string& name, nn::AnyModule layer) {
  parent.register_module(name, layer.ptr());
  return layer;
}

std::string names_list() {
  std::string out;
  for (const auto& name : resnet_names()) out += (out.empty() ? "" : ", ") + name;
  return out;
}

}  // namespace

nn::AnyModule batch_norm_2d(std::int64_t channels) {
  return nn::AnyModule(nn::BatchNorm2d(channels));
}

NormFactory sync_batch_norm_2d(std::shared_ptr<collectives::Communicator> comm) {
  return [comm = std::move(comm)](std::int64_t channels) {
    parallel::SyncBatchNormOptions options;
    options.num_features = channels;
    return nn::AnyModule(parallel::SyncBatchNorm(options, comm));
  };
}

void ResNetOptions::validate() const {
  const std::size_t stages = layout == Layout::kImageNet ? 4 : 3;
  DTRAIN_CHECK_ARG(blocks_per_stage.size() == stages, "ResNetOptions: blocks_per_stage needs ",
                   stages, " entries for this layout, got ", blocks_per_stage.size());
  for (int blocks : blocks_per_stage) {
    DTRAIN_CHECK_ARG(blocks >= 1, "ResNetOptions: every stage needs at least one block");
  }
  DTRAIN_CHECK_ARG(in_channels >= 1, "ResNetOptions: in_channels must be >= 1, got ", in_channels);
  DTRAIN_CHECK_ARG(num_classes >= 1, "ResNetOptions: num_classes must be >= 1, got ", num_classes);
  DTRAIN_CHECK_ARG(block == BlockKind::kBasic || shortcut == Shortcut::kProjection,
                   "ResNetOptions: Bottleneck blocks need Shortcut::kProjection");
  DTRAIN_CHECK_ARG(layout == Layout::kCifar || shortcut == Shortcut::kProjection,
                   "ResNetOptions: the ImageNet layout uses Shortcut::kProjection");
}

BasicBlockImpl::BasicBlockImpl(std::int64_t in_channels, std::int64_t out_channels,
                               std::int64_t stride, Shortcut shortcut, const NormFactory& norm)
    : stride_(stride) {
  conv1_ = register_module("conv1", conv(in_channels, out_channels, 3, stride));
  bn1_ = registered(*this, "bn1", norm(out_channels));
  conv2_ = register_module("conv2", conv(out_channels, out_channels, 3, 1));
  bn2_ = registered(*this, "bn2", norm(out_channels));
  if (stride != 1 || in_channels != out_channels) {
    if (shortcut == Shortcut::kProjection) {
      projection_ =
          register_module("shortcut", projection(in_channels, out_channels, stride, norm));
    } else {
      DTRAIN_CHECK_ARG(out_channels >= in_channels,
                       "BasicBlock: a zero-padded shortcut cannot reduce channels");
      pad_channels_ = out_channels - in_channels;
    }
  }
}

torch::Tensor BasicBlockImpl::forward(const torch::Tensor& x) {
  auto out = torch::relu(bn1_.forward(conv1_(x)));
  out = bn2_.forward(conv2_(out));
  torch::Tensor identity = x;
  if (projection_) {
    identity = projection_->forward(x);
  } else if (stride_ != 1 || pad_channels_ != 0) {
    // Option A: keep every stride-th pixel, then add zero channels split
    // evenly before and after the existing ones.
    using torch::indexing::None;
    using torch::indexing::Slice;
    identity = x.index({Slice(), Slice(), Slice(None, None, stride_), Slice(None, None, stride_)});
    if (pad_channels_ != 0) {
      const std::int64_t before = pad_channels_ / 2;
      identity = nn::functional::pad(
          identity, nn::functional::PadFuncOptions({0, 0, 0, 0, before, pad_channels_ - before}));
    }
  }
  return torch::relu(out + identity);
}

BottleneckImpl::BottleneckImpl(std::int64_t in_channels, std::int64_t base_channels,
                               std::int64_t stride, const NormFactory& norm) {
  const std::int64_t out_channels = base_channels * kExpansion;
  conv1_ = register_module("conv1", conv(in_channels, base_channels, 1, 1));
  bn1_ = registered(*this, "bn1", norm(base_channels));
  conv2_ = register_module("conv2", conv(base_channels, base_channels, 3, stride));
  bn2_ = registered(*this, "bn2", norm(base_channels));
  conv3_ = register_module("conv3", conv(base_channels, out_channels, 1, 1));
  bn3_ = registered(*this, "bn3", norm(out_channels));
  if (stride != 1 || in_channels != out_channels) {
    projection_ = register_module("shortcut", projection(in_channels, out_channels, stride, norm));
  }
}

torch::Tensor BottleneckImpl::forward(const torch::Tensor& x) {
  auto out = torch::relu(bn1_.forward(conv1_(x)));
  out = torch::relu(bn2_.forward(conv2_(out)));
  out = bn3_.forward(conv3_(out));
  return torch::relu(out + (projection_ ? projection_->forward(x) : x));
}

ResNetImpl::ResNetImpl(const ResNetOptions& options) : options_(options) {
  options_.validate();
  const bool imagenet = options_.layout == Layout::kImageNet;
  const std::int64_t stem_channels = imagenet ? 64 : 16;
  const NormFactory norm = options_.norm ? options_.norm : NormFactory(batch_norm_2d);
  stem_ =
      nn::Sequential(conv(options_.in_channels, stem_channels, imagenet ? 7 : 3, imagenet ? 2 : 1));
  stem_->push_back(norm(stem_channels));
  stem_->push_back(nn::ReLU());
  if (imagenet) stem_->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
  register_module("stem", stem_);

  std::int64_t channels = stem_channels;
  for (std::size_t s = 0; s < options_.blocks_per_stage.size(); ++s) {
    const std::int64_t base = stem_channels << s;
    nn::Sequential stage;
    for (int b = 0; b < options_.blocks_per_stage[s]; ++b) {
      const std::int64_t stride = (b == 0 && s > 0) ? 2 : 1;
      if (options_.block == BlockKind::kBasic) {
        stage->push_back(BasicBlock(channels, base, stride, options_.shortcut, norm));
        channels = base;
      } else {
        stage->push_back(Bottleneck(channels, base, stride, norm));
        channels = base * BottleneckImpl::kExpansion;
      }
    }
    // torchvision's names: layer1 .. layer4.
    stages_.push_back(register_module("layer" + std::to_string(s + 1), stage));
  }
  fc_ = register_module("fc", nn::Linear(channels, options_.num_classes));
  initialize_weights();
}

void ResNetImpl::initialize_weights() {
  torch::NoGradGuard no_grad;
  for (const auto& module : modules(/*include_self=*/false)) {
    if (auto* c = module->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(c->weight, /*a=*/0, torch::kFanOut, torch::kReLU);
    } else if (module->as<nn::Linear>() == nullptr) {
      // A normalization layer (BatchNorm2d or any NormFactory's): scale 1, shift 0.
      auto params = module->named_parameters(/*recurse=*/false);
      if (auto* w = params.find("weight")) nn::init::ones_(*w);
      if (auto* b = params.find("bias")) nn::init::zeros_(*b);
    }
  }
  if (!options_.zero_init_residual) return;
  for (const auto& module : modules(/*include_self=*/false)) {
    if (auto* block = module->as<BasicBlock>()) {
      nn::init::zeros_(block->last_bn()->named_parameters(false)["weight"]);
    } else if (auto* bottleneck = module->as<Bottleneck>()) {
      nn::init::zeros_(bottleneck->last_bn()->named_parameters(false)["weight"]);
    }
  }
}

torch::Tensor ResNetImpl::forward(const torch::Tensor& x) {
  DTRAIN_CHECK_ARG(x.dim() == 4 && x.size(1) == options_.in_channels, "ResNet: expected input N x ",
                   options_.in_channels, " x H x W, got ", x.sizes());
  auto out = stem_->forward(x);
  for (auto& stage : stages_) out = stage->forward(out);
  out = nn::functional::adaptive_avg_pool2d(out, nn::functional::AdaptiveAvgPool2dFuncOptions(1));
  return fc_(out.flatten(1));
}

std::vector<parallel::pipeline::Layer> ResNetImpl::layers() const {
  std::vector<parallel::pipeline::Layer> out = parallel::pipeline::layers_of(stem_, "stem");
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    for (auto& layer : parallel::pipeline::layers_of(stages_[s], "layer" + std::to_string(s + 1))) {
      out.push_back(std::move(layer));
    }
  }
  out.push_back({"pool", nn::AnyModule(nn::Functional([](const torch::Tensor& x) {
                   return nn::functional::adaptive_avg_pool2d(
                              x, nn::functional::AdaptiveAvgPool2dFuncOptions(1))
                       .flatten(1);
                 }))});
  out.push_back({"fc", nn::AnyModule(fc_)});
  return out;
}

std::vector<std::string> resnet_names() {
  return {"resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet56"};
}

ResNetOptions resnet_options(const std::string& name, std::int64_t in_channels,
                             std::int64_t num_classes) {
  static const std::map<std::string, std::pair<BlockKind, std::vector<int>>> kImageNet = {
      {"resnet18", {BlockKind::kBasic, {2, 2, 2, 2}}},
      {"resnet34", {BlockKind::kBasic, {3, 4, 6, 3}}},
      {"resnet50", {BlockKind::kBottleneck, {3, 4, 6, 3}}},
  };
  static const std::map<std::string, int> kCifarBlocks = {
      {"resnet20", 3}, {"resnet32", 5}, {"resnet56", 9}};
  ResNetOptions options;
  options.in_channels = in_channels;
  options.num_classes = num_classes;
  if (auto it = kImageNet.find(name); it != kImageNet.end()) {
    options.layout = Layout::kImageNet;
    options.block = it->second.first;
    options.blocks_per_stage = it->second.second;
    options.shortcut = Shortcut::kProjection;
  } else if (auto cifar = kCifarBlocks.find(name); cifar != kCifarBlocks.end()) {
    options.layout = Layout::kCifar;
    options.block = BlockKind::kBasic;
    options.blocks_per_stage = {cifar->second, cifar->second, cifar->second};
    options.shortcut = Shortcut::kZeroPad;
  } else {
    DTRAIN_THROW(InvalidArgument, "unknown ResNet '", name, "'; valid names: ", names_list());
  }
  options.validate();
  return options;
}

ResNet make_resnet(const std::string& name, std::int64_t in_channels, std::int64_t num_classes,
                   bool zero_init_residual, NormFactory norm) {
  ResNetOptions options = resnet_options(name, in_channels, num_classes);
  options.zero_init_residual = zero_init_residual;
  options.norm = std::move(norm);
  return ResNet(options);
}

std::int64_t parameter_count(const torch::nn::Module& module) {
  std::int64_t total = 0;
  for (const auto& p : module.parameters()) {
    if (p.requires_grad()) total += p.numel();
  }
  return total;
}

}  // namespace dtrain::resnet
