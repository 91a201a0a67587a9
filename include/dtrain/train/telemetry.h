#pragma once
// What the trainer (dtrain/train/trainer.h) reports while it runs (see
// docs/metrics.md):
//   MetricsLog  one JSON object per line, per rank (metrics-rankRRRRR.jsonl)
//   TraceLog    Chrome trace events, per rank (trace-rankRRRRR.json),
//               system-clock microseconds so ranks share one time line
//   Progress    rank 0's console: a progress bar on a terminal, plain
//               periodic lines otherwise

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dtrain::train {

using SystemTime = std::chrono::system_clock::time_point;

/// Appends JSON lines to a file; each line is written with one write() call,
/// so a process killed mid-run never leaves half a line.
class MetricsLog {
 public:
  MetricsLog() = default;
  /// Opens `path` for appending (creates its directory). Throws dtrain::Error.
  explicit MetricsLog(const std::string& path);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  /// Adds "time" (unix seconds) and writes the object as one line.
  void write(nlohmann::json record);
  bool enabled() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

/// Chrome trace-event file of one rank; events are kept in memory and the
/// whole file is rewritten by flush() (at checkpoints and at exit).
class TraceLog {
 public:
  TraceLog() = default;
  TraceLog(std::string path, int rank, int world_size);

  bool enabled() const { return !path_.empty(); }
  /// A complete event ("ph": "X") on thread `tid` (0 compute, 1 communication).
  void span(const std::string& name, SystemTime begin, SystemTime end, int tid = 0,
            nlohmann::json args = nlohmann::json::object());
  /// Writes the file (through a temporary name and a rename).
  void flush() const;

 private:
  std::string path_;
  int rank_ = 0;
  int world_size_ = 1;
  std::vector<nlohmann::json> events_;
};

/// Rank 0's console output.
class Progress {
 public:
  /// `bar`: redraw one line (a terminal); otherwise a plain line every `every` steps.
  /// `rate_unit` follows the throughput ("img/s", "tok/s").
  Progress(bool enabled, bool bar, std::int64_t total_steps, std::int64_t first_step, int every,
           std::string rate_unit = "img/s");
  void update(std::int64_t step, std::int64_t epoch, double loss, double samples_per_s);
  /// A line of its own (ends the bar's line first).
  void message(const std::string& text);
  void finish();

 private:
  bool enabled_;
  bool tty_;
  std::int64_t total_;
  std::int64_t first_;
  int every_;
  std::string rate_unit_;
  bool bar_open_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace dtrain::train
