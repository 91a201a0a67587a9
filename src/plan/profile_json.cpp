// The JSON form of a planner profile and of predictions (planner.h).

#include <nlohmann/json.hpp>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/plan/planner.h"

namespace dtrain::plan {

namespace {

using json = nlohmann::json;

constexpr const char* kFormat = "dtrain-plan-profile";
constexpr int kVersion = 1;

const char* partition_name(Partition p) {
  return p == Partition::kUniform ? "uniform" : "balanced";
}

// Reads fields of one JSON object, naming where a field is missing, of the
// wrong type or unknown.
class Reader {
 public:
  Reader(const json& object, std::string where, const std::string& source)
      : object_(object), where_(std::move(where)), source_(source) {
    DTRAIN_CHECK_ARG(object_.is_object(), source_, ": ", where_, " must be a JSON object");
  }

  template <typename T>
  T get(const std::string& key) {
    seen_.insert(key);
    DTRAIN_CHECK_ARG(object_.contains(key), source_, ": ", where_, " has no \"", key, "\"");
    try {
      return object_.at(key).get<T>();
    } catch (const json::exception&) {
      DTRAIN_THROW(InvalidArgument, source_, ": ", where_, ".", key, " has the wrong type (",
                   object_.at(key).dump(), ")");
    }
  }

  template <typename T>
  T get(const std::string& key, T fallback) {
    if (!object_.contains(key)) {
      seen_.insert(key);
      return fallback;
    }
    return get<T>(key);
  }

  const json& object(const std::string& key) {
    seen_.insert(key);
    DTRAIN_CHECK_ARG(object_.contains(key), source_, ": ", where_, " has no \"", key, "\"");
    return object_.at(key);
  }

  // Call after reading: refuses fields nobody asked for.
  void finish() const {
    for (const auto& item : object_.items()) {
      DTRAIN_CHECK_ARG(seen_.count(item.key()) > 0, source_, ": unknown field \"", item.key(),
                       "\" in ", where_);
    }
  }

 private:
  const json& object_;
  std::string where_;
  const std::string& source_;
  std::set<std::string> seen_;
};

}  // namespace

std::string profile_to_json(const PlanProfile& profile) {
  profile.model.validate();
  profile.machine.validate();
  const ModelProfile& m = profile.model;
  json layers = json::array();
  for (const LayerProfile& l : m.layers) {
    layers.push_back({{"name", l.name},
                      {"parameters", l.parameters},
                      {"forward_seconds", l.forward_seconds},
                      {"backward_seconds", l.backward_seconds},
                      {"output_bytes", l.output_bytes},
                      {"saved_bytes", l.saved_bytes},
                      {"replicated_saved_bytes", l.replicated_saved_bytes},
                      {"tensor_parallel", l.tensor_parallel},
                      {"tp_all_reduces", l.tp_all_reduces},
                      {"stage_unit", l.stage_unit}});
  }
  const MachineProfile& c = profile.machine;
  json out = {{"format", kFormat},
              {"version", kVersion},
              {"model",
               {{"name", m.name},
                {"unit", m.unit},
                {"units_per_sample", m.units_per_sample},
                {"bytes_per_parameter", m.bytes_per_parameter},
                {"optimizer_states", m.optimizer_states},
                {"partition", partition_name(m.partition)},
                {"limits",
                 {{"tp_must_divide", m.limits.tp_must_divide},
                  {"stages_must_divide", m.limits.stages_must_divide},
                  {"sequence", m.limits.sequence},
                  {"zero_with_tp", m.limits.zero_with_tp},
                  {"zero_with_pp", m.limits.zero_with_pp}}},
                {"layers", layers}}},
              {"machine",
               {{"description", profile.machine_description},
                {"all_reduce_bandwidth", c.all_reduce_bandwidth},
                {"all_reduce_latency", c.all_reduce_latency},
                {"p2p_bandwidth", c.p2p_bandwidth},
                {"p2p_latency", c.p2p_latency},
                {"cores", c.cores},
                {"memory_per_rank", c.memory_per_rank},
                {"base_bytes_per_rank", c.base_bytes_per_rank}}}};
  return out.dump(2) + "\n";
}

PlanProfile profile_from_json(const std::string& text, const std::string& source) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    DTRAIN_THROW(InvalidArgument, source, ": not valid JSON: ", e.what());
  }
  Reader top(doc, "the profile", source);
  const std::string format = top.get<std::string>("format");
  DTRAIN_CHECK_ARG(format == kFormat, source, ": format is \"", format, "\", expected \"", kFormat,
                   "\"");
  const int version = top.get<int>("version");
  DTRAIN_CHECK_ARG(version == kVersion, source, ": version ", version,
                   " is not supported (this is ", kVersion, ")");
  PlanProfile p;
  Reader model(top.object("model"), "model", source);
  p.model.name = model.get<std::string>("name");
  p.model.unit = model.get<std::string>("unit", std::string("samples"));
  p.model.units_per_sample = model.get<std::int64_t>("units_per_sample", 1);
  p.model.bytes_per_parameter = model.get<int>("bytes_per_parameter", 4);
  p.model.optimizer_states = model.get<int>("optimizer_states", 1);
  const std::string partition = model.get<std::string>("partition", std::string("uniform"));
  DTRAIN_CHECK_ARG(partition == "uniform" || partition == "balanced", source,
                   ": model.partition is \"", partition, "\", expected uniform or balanced");
  p.model.partition = partition == "uniform" ? Partition::kUniform : Partition::kBalanced;
  Reader limits(model.object("limits"), "model.limits", source);
  p.model.limits.tp_must_divide =
      limits.get<std::vector<std::int64_t>>("tp_must_divide", std::vector<std::int64_t>{});
  p.model.limits.stages_must_divide =
      limits.get<std::vector<std::int64_t>>("stages_must_divide", std::vector<std::int64_t>{});
  p.model.limits.sequence = limits.get<std::int64_t>("sequence", 0);
  p.model.limits.zero_with_tp = limits.get<bool>("zero_with_tp", false);
  p.model.limits.zero_with_pp = limits.get<bool>("zero_with_pp", false);
  limits.finish();
  const json& layers = model.object("layers");
  DTRAIN_CHECK_ARG(layers.is_array(), source, ": model.layers must be an array");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    Reader r(layers[i], "model.layers[" + std::to_string(i) + "]", source);
    LayerProfile l;
    l.name = r.get<std::string>("name");
    l.parameters = r.get<std::int64_t>("parameters");
    l.forward_seconds = r.get<double>("forward_seconds");
    l.backward_seconds = r.get<double>("backward_seconds");
    l.output_bytes = r.get<std::int64_t>("output_bytes");
    l.saved_bytes = r.get<std::int64_t>("saved_bytes");
    l.replicated_saved_bytes = r.get<std::int64_t>("replicated_saved_bytes", 0);
    l.tensor_parallel = r.get<bool>("tensor_parallel", false);
    l.tp_all_reduces = r.get<int>("tp_all_reduces", 0);
    l.stage_unit = r.get<bool>("stage_unit", true);
    r.finish();
    p.model.layers.push_back(l);
  }
  p.model.limits.layers =
      static_cast<int>(std::count_if(p.model.layers.begin(), p.model.layers.end(),
                                     [](const LayerProfile& l) { return l.stage_unit; }));
  model.finish();
  Reader machine(top.object("machine"), "machine", source);
  p.machine_description = machine.get<std::string>("description", std::string());
  p.machine.all_reduce_bandwidth = machine.get<double>("all_reduce_bandwidth");
  p.machine.all_reduce_latency = machine.get<double>("all_reduce_latency");
  p.machine.p2p_bandwidth = machine.get<double>("p2p_bandwidth");
  p.machine.p2p_latency = machine.get<double>("p2p_latency");
  p.machine.cores = machine.get<int>("cores", 0);
  p.machine.memory_per_rank = machine.get<std::int64_t>("memory_per_rank", 0);
  p.machine.base_bytes_per_rank = machine.get<std::int64_t>("base_bytes_per_rank", 0);
  machine.finish();
  top.finish();
  try {
    p.model.validate();
    p.machine.validate();
  } catch (const InvalidArgument& e) {
    DTRAIN_THROW(InvalidArgument, source, ": ", e.what());
  }
  return p;
}

std::string predictions_to_json(const std::vector<Prediction>& predictions) {
  json out = json::array();
  for (const Prediction& p : predictions) {
    const Layout& l = p.layout;
    out.push_back({{"layout", l.name()},
                   {"dp", l.dp},
                   {"pp", l.pp},
                   {"tp", l.tp},
                   {"schedule", l.pp > 1 ? parallel::pipeline::schedule_kind_name(l.schedule) : ""},
                   {"microbatches", l.microbatches},
                   {"stages_per_rank", l.stages_per_rank},
                   {"sequence_parallel", l.sequence_parallel},
                   {"zero", l.zero},
                   {"step_seconds", p.step_seconds},
                   {"compute_seconds", p.compute_seconds},
                   {"communication_seconds", p.communication_seconds},
                   {"bubble_seconds", p.bubble_seconds},
                   {"throughput", p.throughput},
                   {"peak_bytes", p.peak_bytes},
                   {"state_bytes", p.state_bytes},
                   {"activation_bytes", p.activation_bytes},
                   {"bytes_sent_per_step", p.bytes_sent_per_step},
                   {"fits", p.fits}});
  }
  return out.dump(2) + "\n";
}

}  // namespace dtrain::plan
