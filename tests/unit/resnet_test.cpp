// ResNet models: output shapes at small inputs, the papers' parameter
// counts, initialisation, and the factory's error for an unknown name.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <string>

#include "dtrain/error.h"
#include "examples/resnet/resnet.h"

namespace dtrain::resnet {
namespace {

struct ShapeCase {
  std::string name;
  std::int64_t in_channels;
  std::int64_t size;  // input height and width
  std::int64_t num_classes;
};

class ResNetShapeTest : public ::testing::TestWithParam<ShapeCase> {};

TEST_P(ResNetShapeTest, ForwardGivesOneLogitRowPerSample) {
  const ShapeCase& c = GetParam();
  torch::manual_seed(0);
  auto model = make_resnet(c.name, c.in_channels, c.num_classes);
  auto out = model->forward(torch::randn({2, c.in_channels, c.size, c.size}));
  EXPECT_EQ(out.sizes(), (torch::IntArrayRef{2, c.num_classes}));
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  // Backward reaches every parameter.
  out.sum().backward();
  for (const auto& p : model->named_parameters()) {
    EXPECT_TRUE(p.value().grad().defined()) << p.key();
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllModels, ResNetShapeTest,
    ::testing::Values(ShapeCase{"resnet18", 3, 32, 7}, ShapeCase{"resnet34", 1, 32, 5},
                      ShapeCase{"resnet50", 3, 32, 4}, ShapeCase{"resnet20", 1, 28, 10},
                      ShapeCase{"resnet32", 3, 16, 3}, ShapeCase{"resnet56", 2, 8, 10}),
    [](const auto& info) { return info.param.name; });

TEST(ResNet, ParameterCountsMatchThePapers) {
  // He et al.: ResNet-20 ~0.27M (option A shortcuts add none).
  EXPECT_EQ(parameter_count(*make_resnet("resnet20", 3, 10)), 269722);
  EXPECT_NEAR(parameter_count(*make_resnet("resnet32", 3, 10)) / 1e6, 0.46, 0.01);
  EXPECT_NEAR(parameter_count(*make_resnet("resnet56", 3, 10)) / 1e6, 0.85, 0.01);
  // torchvision's counts for 1000 classes.
  EXPECT_EQ(parameter_count(*make_resnet("resnet18", 3, 1000)), 11689512);
  EXPECT_EQ(parameter_count(*make_resnet("resnet34", 3, 1000)), 21797672);
  EXPECT_EQ(parameter_count(*make_resnet("resnet50", 3, 1000)), 25557032);
}

TEST(ResNet, ProjectionShortcutsAddParameters) {
  ResNetOptions options = resnet_options("resnet20", 3, 10);
  options.shortcut = Shortcut::kProjection;
  ResNet model(options);
  // Two 1x1 conv + BN projections: 16*32 + 2*32 and 32*64 + 2*64.
  EXPECT_EQ(parameter_count(*model), 269722 + 512 + 64 + 2048 + 128);
  EXPECT_EQ(model->forward(torch::randn({2, 3, 32, 32})).sizes(), (torch::IntArrayRef{2, 10}));
}

TEST(ResNet, InitialisationFollowsThePapers) {
  torch::manual_seed(0);
  auto model = make_resnet("resnet20", 3, 10);
  for (const auto& p : model->named_parameters()) {
    const std::string& name = p.key();
    if (name.find("bn") != std::string::npos || name.rfind("stem.1.", 0) == 0) {
      const double expected = name.size() > 6 && name.substr(name.size() - 6) == "weight" ? 1 : 0;
      EXPECT_TRUE(torch::all(p.value() == expected).item<bool>()) << name;
    }
  }
  // Kaiming normal, fan_out: std = sqrt(2 / (out_channels * 3 * 3)).
  const at::Tensor w = model->named_parameters()["layer3.0.conv2.weight"];
  EXPECT_NEAR(w.std().item<double>(), std::sqrt(2.0 / (64 * 9)), 0.005);
}

TEST(ResNet, ZeroInitResidualZeroesTheLastBnOfEachBranch) {
  auto model = make_resnet("resnet50", 3, 10, /*zero_init_residual=*/true);
  int zeroed = 0;
  for (const auto& p : model->named_parameters()) {
    if (p.key().find("bn3.weight") != std::string::npos) {
      EXPECT_EQ(p.value().abs().sum().item<double>(), 0.0) << p.key();
      ++zeroed;
    }
  }
  EXPECT_EQ(zeroed, 16);  // 3 + 4 + 6 + 3 Bottlenecks
  auto basic = make_resnet("resnet20", 3, 10, true);
  EXPECT_EQ(basic->named_parameters()["layer1.0.bn2.weight"].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(basic->named_parameters()["layer1.0.bn1.weight"].sum().item<double>(), 16.0);
}

TEST(ResNet, UnknownNameListsTheValidOnes) {
  try {
    make_resnet("resnet19", 3, 10);
    FAIL() << "expected InvalidArgument";
  } catch (const dtrain::InvalidArgument& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("resnet19"), std::string::npos) << message;
    for (const auto& name : resnet_names()) {
      EXPECT_NE(message.find(name), std::string::npos) << message;
    }
  }
}

TEST(ResNet, BadOptionsAndInputsAreRejected) {
  EXPECT_THROW(make_resnet("resnet18", 0, 10), dtrain::InvalidArgument);
  EXPECT_THROW(make_resnet("resnet18", 3, 0), dtrain::InvalidArgument);
  ResNetOptions options;
  options.blocks_per_stage = {3, 3};
  EXPECT_THROW(options.validate(), dtrain::InvalidArgument);
  auto model = make_resnet("resnet20", 1, 10);
  EXPECT_THROW(model->forward(torch::randn({2, 3, 28, 28})), dtrain::InvalidArgument);
}

}  // namespace
}  // namespace dtrain::resnet
