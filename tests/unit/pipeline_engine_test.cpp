// The parts of the pipeline engine that need no ranks: the per-stage input
// shapes, the options' checks and the trace's CSV form.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/engine.h"

namespace dtrain::parallel::pipeline {
namespace {

TEST(StageInputShapesTest, ShapesInFrontOfEachStageWithoutTheBatchDimension) {
  namespace nn = torch::nn;
  nn::Sequential model(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::ReLU(), nn::Flatten(),
                       nn::Linear(4 * 6 * 6, 10), nn::Dropout(0.5), nn::Linear(10, 3));
  model->train();
  const auto layers = layers_of(model);
  const auto partition = partition_at(6, {2, 4});
  const auto shapes = stage_input_shapes(layers, partition, torch::randn({5, 1, 8, 8}));
  ASSERT_EQ(shapes.size(), 3u);
  EXPECT_EQ(shapes[0], (std::vector<std::int64_t>{1, 8, 8}));
  EXPECT_EQ(shapes[1], (std::vector<std::int64_t>{4, 6, 6}));
  EXPECT_EQ(shapes[2], (std::vector<std::int64_t>{10}));
  // Each layer's mode is back as it was.
  for (const auto& child : model->children()) EXPECT_TRUE(child->is_training());
  EXPECT_THROW(stage_input_shapes(layers, partition_at(5, {2}), torch::randn({1, 1, 8, 8})),
               InvalidArgument);
}

TEST(PipelineOptionsTest, RefusesNegativeShapesAndBadSchedules) {
  PipelineOptions options;
  options.stage_input_shapes = {{}, {4, -1}};
  EXPECT_THROW(options.validate(), InvalidArgument);
  options.stage_input_shapes = {{}, {4}};
  EXPECT_NO_THROW(options.validate());
  options.schedule.kind = ScheduleKind::kZeroBubbleH1;
  options.schedule.num_ranks = 4;
  options.schedule.num_microbatches = 2;  // ZB-H1 needs m >= p
  EXPECT_THROW(options.validate(), InvalidArgument);
}

TEST(TraceTest, CsvHasOneRowPerAction) {
  std::vector<ActionRecord> trace(3);
  trace[0].action = Action::forward(1, 0);
  trace[0].start_seconds = 1.5;
  trace[0].end_seconds = 1.75;
  trace[1].action = Action::send_activation(1, 0, 2);
  trace[2].action = Action::reduce(1);
  trace[2].heap_bytes = 4096;
  const std::string csv = trace_to_csv(trace, 1);
  EXPECT_EQ(csv,
            "rank,kind,stage,microbatch,start,end,wait,heap\n"
            "1,F,1,0,1.500000000,1.750000000,0.000000000,0\n"
            "1,sendF,1,0,0.000000000,0.000000000,0.000000000,0\n"
            "1,reduce,1,-1,0.000000000,0.000000000,0.000000000,4096\n");
  EXPECT_EQ(trace_to_csv(trace, 1, /*header=*/false).find("rank,"), std::string::npos);
}

}  // namespace
}  // namespace dtrain::parallel::pipeline
