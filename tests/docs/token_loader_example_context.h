#pragma once
// What the example in dtrain/data/token_loader.h takes from the program
// around it. Declarations only: the example is compiled, never linked or run.

#include "dtrain/data/token_loader.h"
#include "dtrain/parallel/parallel_context.h"

namespace dtrain_doc_examples::token_loader_1 {
extern dtrain::parallel::ParallelContext& ctx;
}  // namespace dtrain_doc_examples::token_loader_1
