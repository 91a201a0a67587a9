#include "dtrain/train/telemetry.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "dtrain/error.h"

namespace dtrain::train {

namespace fs = std::filesystem;

namespace {

double unix_seconds(SystemTime t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

double unix_micros(SystemTime t) {
  return std::chrono::duration<double, std::micro>(t.time_since_epoch()).count();
}

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "--:--";
  const auto s = static_cast<long long>(seconds + 0.5);
  char text[32];
  if (s >= 3600) {
    std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  } else {
    std::snprintf(text, sizeof(text), "%02lld:%02lld", s / 60, s % 60);
  }
  return text;
}

}  // namespace

MetricsLog::MetricsLog(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  DTRAIN_CHECK(fd_ >= 0, "cannot open metrics file ", path, ": ", std::strerror(errno));
}

MetricsLog::~MetricsLog() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsLog::write(nlohmann::json record) {
  if (fd_ < 0) return;
  record["time"] = unix_seconds(std::chrono::system_clock::now());
  const std::string line = record.dump() + "\n";
  // O_APPEND + one write(): the line lands whole (a failure only loses it).
  const ssize_t n = ::write(fd_, line.data(), line.size());
  (void)n;
}

TraceLog::TraceLog(std::string path, int rank, int world_size)
    : path_(std::move(path)), rank_(rank), world_size_(world_size) {
  const fs::path parent = fs::path(path_).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
}

void TraceLog::span(const std::string& name, SystemTime begin, SystemTime end, int tid,
                    nlohmann::json args) {
  if (!enabled()) return;
  const double ts = unix_micros(begin);
  events_.push_back({{"name", name},
                     {"cat", tid == 0 ? "compute" : "communication"},
                     {"ph", "X"},
                     {"ts", ts},
                     {"dur", std::max(0.0, unix_micros(end) - ts)},
                     {"pid", rank_},
                     {"tid", tid},
                     {"args", std::move(args)}});
}

void TraceLog::flush() const {
  if (!enabled()) return;
  const nlohmann::json doc = {
      {"traceEvents", events_},
      {"displayTimeUnit", "ms"},
      {"otherData", {{"rank", rank_}, {"world_size", world_size_}, {"clock", "unix_us"}}}};
  const std::string tmp = path_ + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << doc.dump();
    out.close();
    if (out.fail()) return;  // a trace is best effort; never replace a good one by a partial one
  }
  std::error_code ec;
  fs::rename(tmp, path_, ec);
}

Progress::Progress(bool enabled, bool bar, std::int64_t total_steps, std::int64_t first_step,
                   int every, std::string rate_unit)
    : enabled_(enabled),
      tty_(enabled && bar),
      total_(total_steps),
      first_(first_step),
      every_(every < 1 ? 1 : every),
      rate_unit_(std::move(rate_unit)) {}

void Progress::update(std::int64_t step, std::int64_t epoch, double loss, double samples_per_s) {
  if (!enabled_) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double done = static_cast<double>(step - first_);
  const double eta = done > 0 ? elapsed / done * static_cast<double>(total_ - step) : -1;
  if (tty_) {
    constexpr int kWidth = 30;
    const double fraction =
        total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 0;
    const int filled = static_cast<int>(fraction * kWidth);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::printf("\r[%s] epoch %lld step %lld/%lld loss %.4f %.0f %s ETA %s   ", bar.c_str(),
                static_cast<long long>(epoch), static_cast<long long>(step),
                static_cast<long long>(total_), loss, samples_per_s, rate_unit_.c_str(),
                format_duration(eta).c_str());
    std::fflush(stdout);
    bar_open_ = true;
  } else if (step % every_ == 0 || step == total_) {
    std::printf("epoch %lld step %lld/%lld loss %.4f %.0f %s elapsed %s ETA %s\n",
                static_cast<long long>(epoch), static_cast<long long>(step),
                static_cast<long long>(total_), loss, samples_per_s, rate_unit_.c_str(),
                format_duration(elapsed).c_str(), format_duration(eta).c_str());
    std::fflush(stdout);
  }
}

void Progress::message(const std::string& text) {
  if (!enabled_) return;
  if (bar_open_) {
    std::printf("\n");
    bar_open_ = false;
  }
  std::printf("%s\n", text.c_str());
  std::fflush(stdout);
}

void Progress::finish() {
  if (enabled_ && bar_open_) std::printf("\n");
  bar_open_ = false;
}

}  // namespace dtrain::train
