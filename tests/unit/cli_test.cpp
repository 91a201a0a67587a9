// The command-line conventions every dtrain command shares (src/cli/cli.h):
// boolean values attached or as the next word, errors naming the option,
// no ignored words.

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "src/cli/cli.h"

namespace dtrain::cli {
namespace {

cxxopts::Options make_options() {
  cxxopts::Options options("tool", "a test tool");
  options.add_options()("resume", "resume", cxxopts::value<bool>()->default_value("true"))(
      "zero", "zero", cxxopts::value<bool>()->default_value("false"))(
      "max-minutes", "limit", cxxopts::value<double>()->default_value("0"))(
      "n,iters", "iterations", cxxopts::value<int>()->default_value("20"))(
      "name", "a name", cxxopts::value<std::string>()->default_value(""))(
      "dir", "directory", cxxopts::value<std::string>()->default_value(""))("h,help", "help");
  options.parse_positional({"dir"});
  return options;
}

cxxopts::ParseResult parse_line(std::vector<std::string> words) {
  cxxopts::Options options = make_options();
  words.insert(words.begin(), "tool");
  std::vector<const char*> argv;
  for (const auto& w : words) argv.push_back(w.c_str());
  return parse(options, static_cast<int>(argv.size()), argv.data());
}

std::string usage_error(std::vector<std::string> words) {
  try {
    parse_line(std::move(words));
  } catch (const UsageError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Cli, BooleanValueAttachedOrAsTheNextWord) {
  EXPECT_FALSE(parse_line({"--resume=false"})["resume"].as<bool>());
  EXPECT_FALSE(parse_line({"--resume", "false"})["resume"].as<bool>());
  EXPECT_FALSE(parse_line({"--resume", "0"})["resume"].as<bool>());
  EXPECT_TRUE(parse_line({"--zero", "true"})["zero"].as<bool>());
  EXPECT_TRUE(parse_line({"--zero"})["zero"].as<bool>());
  EXPECT_TRUE(parse_line({})["resume"].as<bool>());
  // Followed by another option or a positional word: the flag alone is true.
  const auto p = parse_line({"--zero", "--resume", "false", "--iters", "3", "somewhere"});
  EXPECT_TRUE(p["zero"].as<bool>());
  EXPECT_FALSE(p["resume"].as<bool>());
  EXPECT_EQ(p["iters"].as<int>(), 3);
  EXPECT_EQ(p["dir"].as<std::string>(), "somewhere");
  EXPECT_TRUE(parse_line({"--zero", "data"})["zero"].as<bool>());
  EXPECT_EQ(parse_line({"--zero", "data"})["dir"].as<std::string>(), "data");
  // A string option's value is never taken for a boolean.
  EXPECT_EQ(parse_line({"--name", "false"})["name"].as<std::string>(), "false");
}

TEST(Cli, AValueThatDoesNotParseNamesTheOption) {
  EXPECT_EQ(usage_error({"--max-minutes", "inf"}),
            "--max-minutes: cannot parse 'inf' (default: 0)");
  EXPECT_EQ(usage_error({"--max-minutes=soon"}), "--max-minutes: cannot parse 'soon' (default: 0)");
  EXPECT_EQ(usage_error({"--resume=maybe"}),
            "--resume: cannot parse 'maybe' (expected true or false)");
  EXPECT_EQ(usage_error({"-n", "many"}), "--iters: cannot parse 'many' (default: 20)");
  EXPECT_EQ(usage_error({"-nmany"}), "--iters: cannot parse 'many' (default: 20)");
  // The right one among several values.
  EXPECT_EQ(usage_error({"--iters", "4", "--max-minutes", "x", "--name", "x"}),
            "--max-minutes: cannot parse 'x' (default: 0)");
}

TEST(Cli, OtherMistakesAreUsageErrors) {
  EXPECT_NE(usage_error({"--frobnicate"}).find("frobnicate"), std::string::npos);
  EXPECT_NE(usage_error({"--iters"}).find("iters"), std::string::npos);  // no value
  EXPECT_EQ(usage_error({"a", "b"}), "unexpected argument 'b'");
  EXPECT_EQ(usage_error({"--resume", "false", "a", "b"}), "unexpected argument 'b'");
  EXPECT_EQ(kExitUsage, 2);
  // A UsageError is an InvalidArgument: callers that map those to exit 2 agree.
  EXPECT_THROW(parse_line({"--frobnicate"}), InvalidArgument);
}

}  // namespace
}  // namespace dtrain::cli
