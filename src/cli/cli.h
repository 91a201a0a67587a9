#pragma once
// The command-line conventions every dtrain command shares (dtrain-data,
// dtrain-ckpt, dtrain-resnet and the benchmarks), on top of cxxopts:
//
//  - A boolean option takes its value attached or as the next word:
//    `--resume=false` and `--resume false` mean the same (the next word is
//    taken only if it is a boolean: true, false, t, f, 1 or 0, any
//    capitalisation cxxopts accepts); a bare `--resume` means true.
//  - A value that does not parse is an error naming the option and the
//    value ("--max-minutes: cannot parse 'inf' (default: 0)"), not only the
//    value, as cxxopts says it.
//  - A word no option or positional argument takes is an error.
//  - Every such mistake is a UsageError, and a command exits with
//    kExitUsage (2) on it, as on any other bad input found before work
//    starts.
//
//   cxxopts::Options options("dtrain-foo", "...");
//   options.add_options()("resume", "...", cxxopts::value<bool>()->default_value("true"));
//   try {
//     const auto parsed = dtrain::cli::parse(options, argc, argv);
//     ...
//   } catch (const dtrain::cli::UsageError& e) {
//     std::cerr << "dtrain-foo: " << e.what() << " (see --help)\n";
//     return dtrain::cli::kExitUsage;
//   }

#include <cxxopts.hpp>

#include "dtrain/error.h"

namespace dtrain::cli {

/// Exit status of every dtrain command for a usage error or other bad input
/// found before any work starts.
constexpr int kExitUsage = 2;

/// A mistake on the command line: an unknown option, a value that does not
/// parse, a missing value, an unexpected word. The message names the option.
class UsageError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// Options::parse(argc, argv) with the conventions above. Throws UsageError.
cxxopts::ParseResult parse(cxxopts::Options& options, int argc, const char* const* argv);

}  // namespace dtrain::cli
