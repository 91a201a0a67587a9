#pragma once
// What the examples in dtrain/data/loader.h take from the program around
// them. Declarations only: the examples are compiled, never linked or run.

#include "dtrain/collectives/process_grid.h"
#include "dtrain/data/loader.h"

namespace dtrain_doc_examples::loader_1 {
extern dtrain::collectives::ProcessGrid& grid;
extern int steps;
extern bool checkpoint_now;
void save(const dtrain::data::SamplerState& state);
}  // namespace dtrain_doc_examples::loader_1

namespace dtrain_doc_examples::loader_2 {
extern dtrain::data::Batch b;
extern dtrain::data::LoaderOptions opt;
}  // namespace dtrain_doc_examples::loader_2
