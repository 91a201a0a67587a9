// SplitPublisher: staging, locking and the renames that publish a
// conversion's splits all or nothing.

#include "src/data/publish.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <regex>
#include <system_error>

#include "dtrain/error.h"

namespace dtrain::data::detail {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStaging = ".convert.tmp";

// What an unfinished DatasetWriter leaves: shard files and a temporary
// manifest. A directory holding only these is no data set and may be
// replaced.
bool only_writer_leftovers(const fs::path& dir) {
  static const std::regex kLeftover(R"(shard-[0-9]{5}\.h5|manifest\.json\.tmp)");
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (!std::regex_match(entry.path().filename().string(), kLeftover)) return false;
  }
  return true;
}

}  // namespace

void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DTRAIN_CHECK_T(DataError, fd >= 0, "cannot open ", dir.string(), ": ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DTRAIN_CHECK_T(DataError, rc == 0, "fsync of ", dir.string(), " failed: ", std::strerror(err));
}

SplitPublisher::SplitPublisher(std::string out_dir, std::vector<std::string> splits)
    : out_(out_dir), splits_(std::move(splits)) {
  std::error_code ec;
  fs::create_directories(out_, ec);
  DTRAIN_CHECK_ARG(!ec && fs::is_directory(out_), "cannot create output directory '", out_dir,
                   "': ", ec ? ec.message() : "not a directory");
  // An exclusive lock on the directory, so that two conversions never write
  // into one output directory at the same time.
  lock_fd_ = ::open(out_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DTRAIN_CHECK_T(DataError, lock_fd_ >= 0, "cannot open ", out_dir, ": ", std::strerror(errno));
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd_);
    DTRAIN_THROW(InvalidArgument, "another conversion is writing into '", out_dir,
                 "'; wait for it to finish");
  }
  try {
    // Refuse at once, before anything is read, what could never be published.
    bool all = true;
    for (std::size_t i = 0; i < splits_.size(); ++i) {
      const fs::path dir = final_dir(i);
      published_.push_back(fs::exists(dir / "manifest.json"));
      all = all && published_.back();
      DTRAIN_CHECK_ARG(published_.back() || !fs::exists(dir) ||
                           (fs::is_directory(dir) && only_writer_leftovers(dir)),
                       "'", dir.string(),
                       "' exists but holds no data set (no manifest.json); remove it or choose "
                       "another --out");
    }
    std::string names;
    for (const auto& s : splits_) names += (names.empty() ? "" : " and ") + s + "/";
    DTRAIN_CHECK_ARG(!all, "'", out_dir, "' already holds ",
                     splits_.size() == 2 ? "both splits" : "every split", " (", names,
                     "); choose an empty directory");
    fs::remove_all(out_ / kStaging);  // left by an interrupted conversion (the lock is ours)
  } catch (...) {
    ::close(lock_fd_);
    throw;
  }
}

SplitPublisher::~SplitPublisher() {
  std::error_code ec;
  fs::remove_all(out_ / kStaging, ec);
  ::close(lock_fd_);
}

std::string SplitPublisher::final_dir(std::size_t i) const { return (out_ / splits_[i]).string(); }

std::string SplitPublisher::staging_dir(std::size_t i) const {
  return (out_ / kStaging / splits_[i]).string();
}

void SplitPublisher::publish() {
  for (std::size_t i = 0; i < splits_.size(); ++i) {
    if (published_[i]) continue;
    const fs::path dir = final_dir(i);
    fs::remove_all(dir);  // nothing, or only an unfinished writer's leftovers (checked above)
    fs::rename(staging_dir(i), dir);
    published_[i] = true;
  }
  fsync_directory(out_);
}

}  // namespace dtrain::data::detail
