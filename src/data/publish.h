#pragma once
// All-or-nothing publication of a conversion's splits (internal; used by
// convert_fashion_mnist and convert_text).
//
//   SplitPublisher pub(out_dir, {"train", "test"});  // creates, locks, refuses early
//   ... read and check every input file ...
//   for each split i: if pub.published(i), check that out_dir/<split> holds
//                     what would be written; else write it into pub.staging(i)
//   pub.publish();                                    // one rename per split
//
// Splits are written into out_dir/.convert.tmp/<split> and renamed into
// place only once every split is written, so a failure at any point (a bad
// input file, a full disk) publishes nothing new and a rerun just works. A
// split already in place (an earlier run stopped between its renames) is
// kept when the caller finds that it holds the same samples. Two
// publishers on one out_dir at a time are refused (flock).

#include <filesystem>
#include <string>
#include <vector>

namespace dtrain::data::detail {

class SplitPublisher {
 public:
  /// Creates `out_dir` if needed and locks it (InvalidArgument when another
  /// conversion holds it). Throws InvalidArgument, before anything is read
  /// or written, if a split directory exists but holds no data set and
  /// more than an unfinished writer's leftovers, or if every split is
  /// already published.
  SplitPublisher(std::string out_dir, std::vector<std::string> splits);
  ~SplitPublisher();  // removes the staging directory
  SplitPublisher(const SplitPublisher&) = delete;
  SplitPublisher& operator=(const SplitPublisher&) = delete;

  /// True if out_dir/<split i> already holds a data set (manifest.json).
  bool published(std::size_t i) const { return published_[i]; }
  /// out_dir/<split i>.
  std::string final_dir(std::size_t i) const;
  /// Where to write split i (a fresh directory under out_dir/.convert.tmp).
  std::string staging_dir(std::size_t i) const;
  /// Renames every staged split into place and fsyncs out_dir.
  void publish();

 private:
  std::filesystem::path out_;
  std::vector<std::string> splits_;
  std::vector<bool> published_;
  int lock_fd_ = -1;
};

/// fsync of a directory (its entries); throws DataError.
void fsync_directory(const std::filesystem::path& dir);

}  // namespace dtrain::data::detail
