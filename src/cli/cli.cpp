// The shared command-line conventions: boolean values as the next word,
// errors that name the option, no ignored words.

#include "src/cli/cli.h"

#include <map>
#include <string>
#include <vector>

namespace dtrain::cli {

namespace {

struct OptionInfo {
  std::string display;  // "--name", or "-x" for an option with only a short name
  bool is_boolean = false;
  bool has_default = false;
  std::string default_value;
};

// Every option, under each of its spellings ("--name", "-x").
std::map<std::string, OptionInfo> option_table(const cxxopts::Options& options) {
  std::map<std::string, OptionInfo> table;
  for (const std::string& group : options.groups()) {
    for (const cxxopts::HelpOptionDetails& o : options.group_help(group).options) {
      OptionInfo info;
      info.display = o.l.empty() ? "-" + o.s : "--" + o.l.front();
      info.is_boolean = o.is_boolean;
      info.has_default = o.has_default;
      info.default_value = o.default_value;
      for (const std::string& name : o.l) table["--" + name] = info;
      if (!o.s.empty()) table["-" + o.s] = info;
    }
  }
  return table;
}

bool is_boolean_word(const std::string& word) {
  return cxxopts::values::parser_tool::IsTrueText(word) ||
         cxxopts::values::parser_tool::IsFalseText(word);
}

// One value given on the command line, and the words that gave it.
struct GivenValue {
  const OptionInfo* option = nullptr;
  std::vector<std::string> words;
  std::string value;
};

cxxopts::ParseResult parse_words(cxxopts::Options& options, const std::vector<std::string>& words) {
  std::vector<const char*> argv;
  for (const std::string& w : words) argv.push_back(w.c_str());
  return options.parse(static_cast<int>(argv.size()), argv.data());
}

std::string hint(const OptionInfo& option) {
  if (option.is_boolean) return " (expected true or false)";
  if (option.has_default && !option.default_value.empty()) {
    return " (default: " + option.default_value + ")";
  }
  return "";
}

}  // namespace

cxxopts::ParseResult parse(cxxopts::Options& options, int argc, const char* const* argv) {
  const std::map<std::string, OptionInfo> table = option_table(options);
  const std::string program = argc > 0 ? argv[0] : "dtrain";
  std::vector<std::string> words{program};
  std::vector<GivenValue> given;
  for (int i = 1; i < argc; ++i) {
    std::string word = argv[i];
    if (word == "--") {  // everything after it is positional
      for (; i < argc; ++i) words.emplace_back(argv[i]);
      break;
    }
    const bool is_long = word.rfind("--", 0) == 0;
    const bool is_short = !is_long && word.size() >= 2 && word[0] == '-';
    const std::size_t equals = is_long ? word.find('=') : std::string::npos;
    const std::string name = is_long ? word.substr(0, equals) : word.substr(0, 2);
    const auto found = (is_long || is_short) ? table.find(name) : table.end();
    if (found == table.end()) {
      words.push_back(word);
      continue;
    }
    const OptionInfo& option = found->second;
    const bool next_is_value =
        i + 1 < argc &&
        (option.is_boolean ? is_boolean_word(argv[i + 1]) : std::string(argv[i + 1]) != "--");
    if (is_long && equals != std::string::npos) {
      given.push_back({&option, {word}, word.substr(equals + 1)});
    } else if (is_short && word.size() > 2) {
      if (!option.is_boolean) given.push_back({&option, {word}, word.substr(2)});
    } else if (option.is_boolean && next_is_value && is_long) {
      word += "=";  // `--flag false` is `--flag=false`
      word += argv[++i];
      given.push_back({&option, {word}, argv[i]});
    } else if (!option.is_boolean && next_is_value) {
      given.push_back({&option, {word, argv[i + 1]}, argv[i + 1]});
      words.push_back(word);
      word = argv[++i];
    }
    words.push_back(word);
  }
  try {
    cxxopts::ParseResult result = parse_words(options, words);
    if (!result.unmatched().empty()) {
      throw UsageError("unexpected argument '" + result.unmatched().front() + "'");
    }
    return result;
  } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
    // cxxopts names the value only: find the option by parsing each value alone.
    for (const GivenValue& g : given) {
      std::vector<std::string> one{program};
      one.insert(one.end(), g.words.begin(), g.words.end());
      try {
        parse_words(options, one);
      } catch (const cxxopts::exceptions::incorrect_argument_type&) {
        throw UsageError(g.option->display + ": cannot parse '" + g.value + "'" + hint(*g.option));
      } catch (const cxxopts::exceptions::exception&) {
      }
    }
    throw UsageError(e.what());
  } catch (const cxxopts::exceptions::exception& e) {
    throw UsageError(e.what());
  }
}

}  // namespace dtrain::cli
