#pragma once
// expect_error: the tests' check that a call throws a given error type whose
// message names what was wrong.

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace dtrain::testing {

/// Expects `fn` to throw E with a message holding every needle.
template <typename E, typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    for (const auto& n : needles) {
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
          << "message lacks '" << n << "': " << e.what();
    }
  }
}

}  // namespace dtrain::testing
