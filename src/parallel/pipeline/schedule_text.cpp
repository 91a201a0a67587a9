// The text form of a schedule (format in schedule.h).

#include <algorithm>
#include <cctype>
#include <charconv>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/schedule.h"

namespace dtrain::parallel::pipeline {
namespace {

// Thrown inside the parser with the column (1-based) of the problem; turned
// into an InvalidArgument naming the source and the line.
struct TextError {
  std::size_t column;
  std::string message;
};

bool is_separator(char c) { return c == ' ' || c == '\t' || c == ',' || c == '\r'; }

// A non-negative decimal number at text[pos...]; advances pos.
std::optional<int> read_number(std::string_view text, std::size_t* pos) {
  const std::size_t begin = *pos;
  while (*pos < text.size() && std::isdigit(static_cast<unsigned char>(text[*pos]))) ++*pos;
  if (*pos == begin || *pos - begin > 9) return std::nullopt;
  int value = 0;
  std::from_chars(text.data() + begin, text.data() + *pos, value);
  return value;
}

struct Prefix {
  std::string_view text;
  ActionKind kind;
};
// Longest first, so "sendF" is not read as something shorter.
constexpr Prefix kPrefixes[] = {
    {"reduce", ActionKind::kReduceGradients},
    {"sendF", ActionKind::kSendActivation},
    {"recvF", ActionKind::kRecvActivation},
    {"sendB", ActionKind::kSendGradient},
    {"recvB", ActionKind::kRecvGradient},
    {"F", ActionKind::kForward},
    {"B", ActionKind::kBackward},
    {"I", ActionKind::kBackwardInput},
    {"W", ActionKind::kBackwardWeight},
};

constexpr const char* kTokenHelp =
    "an action is F<stage>.<microbatch> (also B, I, W), sendF/recvF/sendB/recvB"
    "<stage>.<microbatch> with >peer or <peer, or reduce<stage>";

// Parses one token; `column` is the token's first column (for errors). The
// peer of a send/recv stays kNoPeer when the token leaves it out.
Action parse_token(std::string_view token, std::size_t column) {
  const Prefix* prefix = nullptr;
  for (const Prefix& p : kPrefixes) {
    if (token.substr(0, p.text.size()) == p.text) {
      prefix = &p;
      break;
    }
  }
  if (prefix == nullptr) {
    throw TextError{column, detail::str_cat("'", token, "' is not an action: ", kTokenHelp)};
  }
  Action action{prefix->kind, 0, kNoMicrobatch, kNoPeer};
  std::size_t pos = prefix->text.size();
  const auto fail = [&](const std::string& what) {
    throw TextError{column + pos, detail::str_cat("'", token, "': ", what)};
  };
  const std::optional<int> stage = read_number(token, &pos);
  if (!stage) fail("expected a stage number after '" + std::string(prefix->text) + "'");
  action.stage = *stage;
  if (action.kind == ActionKind::kReduceGradients) {
    if (pos != token.size()) fail("unexpected text after the stage of a reduce (reduce<stage>)");
    return action;
  }
  if (pos >= token.size() || token[pos] != '.') {
    fail("expected '.' and a microbatch number after the stage (" + std::string(prefix->text) +
         "<stage>.<microbatch>)");
  }
  ++pos;
  const std::optional<int> microbatch = read_number(token, &pos);
  if (!microbatch) fail("expected a microbatch number after '.'");
  action.microbatch = *microbatch;
  if (action.is_communication() && pos < token.size()) {
    const char arrow = action.is_send() ? '>' : '<';
    if (token[pos] != arrow) {
      fail(action.is_send() ? "a send names its peer with '>' (sendF0.1>1)"
                            : "a recv names its peer with '<' (recvF1.1<0)");
    }
    ++pos;
    const std::optional<int> peer = read_number(token, &pos);
    if (!peer) fail(std::string("expected a peer rank after '") + arrow + "'");
    action.peer = *peer;
  }
  if (pos != token.size()) fail("unexpected text after the action");
  return action;
}

struct Header {
  int ranks = -1;
  int microbatches = -1;
  int stages = -1;
  std::string placement = "loop";
  std::size_t placement_column = 0;
  std::string name;
};

int header_number(std::string_view value, std::string_view key, std::size_t column) {
  std::size_t pos = 0;
  const std::optional<int> n = read_number(value, &pos);
  if (!n || pos != value.size() || *n < 1) {
    throw TextError{column, detail::str_cat(key, "='", value, "' is not a number >= 1")};
  }
  return *n;
}

Header parse_header(std::string_view line, std::size_t first) {
  Header header;
  std::size_t pos = first + std::string_view("pipeline").size();
  while (pos < line.size()) {
    while (pos < line.size() && is_separator(line[pos])) ++pos;
    if (pos >= line.size()) break;
    const std::size_t begin = pos;
    while (pos < line.size() && !is_separator(line[pos])) ++pos;
    const std::string_view word = line.substr(begin, pos - begin);
    const std::size_t eq = word.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      throw TextError{begin + 1, detail::str_cat("'", word,
                                                 "' is not key=value; the header takes ranks=, "
                                                 "microbatches=, stages=, placement= and name=")};
    }
    const std::string_view key = word.substr(0, eq);
    const std::string_view value = word.substr(eq + 1);
    const std::size_t column = begin + 1;
    if (key == "ranks") {
      header.ranks = header_number(value, key, column);
    } else if (key == "microbatches") {
      header.microbatches = header_number(value, key, column);
    } else if (key == "stages") {
      header.stages = header_number(value, key, column);
    } else if (key == "placement") {
      header.placement = std::string(value);
      header.placement_column = column;
    } else if (key == "name") {
      header.name = std::string(value);
    } else {
      throw TextError{column, detail::str_cat("unknown header key '", key,
                                              "'; the header takes ranks=, microbatches=, stages=, "
                                              "placement= and name=")};
    }
  }
  if (header.ranks < 0) throw TextError{first + 1, "the header needs ranks=<p>"};
  if (header.microbatches < 0) throw TextError{first + 1, "the header needs microbatches=<m>"};
  return header;
}

// The placement; fills in header.stages when the header left it out (the
// placement's length, or one stage per rank for the loop).
std::vector<int> parse_placement(Header& header) {
  if (header.placement == "loop") {
    if (header.stages < 0) header.stages = header.ranks;
    if (header.stages % header.ranks != 0) {
      throw TextError{header.placement_column,
                      detail::str_cat("the loop placement needs the stages (", header.stages,
                                      ") to be a multiple of the ranks (", header.ranks,
                                      "); give placement=<rank>|<rank>|... instead")};
    }
    return loop_placement(header.ranks, header.stages);
  }
  std::vector<int> ranks;
  std::string_view text = header.placement;
  std::size_t pos = 0;
  while (true) {
    const std::optional<int> r = read_number(text, &pos);
    if (!r || *r >= header.ranks) {
      throw TextError{header.placement_column + 10 + pos,
                      detail::str_cat("placement='", text, "': expected 'loop' or the rank (0..",
                                      header.ranks - 1, ") of each stage separated by '|'")};
    }
    ranks.push_back(*r);
    if (pos == text.size()) break;
    if (text[pos] != '|') {
      throw TextError{header.placement_column + 10 + pos,
                      detail::str_cat("placement='", text, "': ranks are separated by '|'")};
    }
    ++pos;
  }
  if (header.stages < 0) header.stages = static_cast<int>(ranks.size());
  if (static_cast<int>(ranks.size()) != header.stages) {
    throw TextError{header.placement_column, detail::str_cat("placement names ", ranks.size(),
                                                             " stages but stages=", header.stages)};
  }
  return ranks;
}

void check_ranges(const Action& a, const Schedule& s, std::size_t column) {
  if (a.stage >= s.num_stages()) {
    throw TextError{column, detail::str_cat("'", a.to_string(), "': stage ", a.stage,
                                            " is out of range (stages=", s.num_stages(), ")")};
  }
  if (a.kind != ActionKind::kReduceGradients && a.microbatch >= s.num_microbatches) {
    throw TextError{column,
                    detail::str_cat("'", a.to_string(), "': microbatch ", a.microbatch,
                                    " is out of range (microbatches=", s.num_microbatches, ")")};
  }
  if (a.is_communication() && a.peer != kNoPeer && a.peer >= s.num_ranks) {
    throw TextError{column, detail::str_cat("'", a.to_string(), "': peer rank ", a.peer,
                                            " is out of range (ranks=", s.num_ranks, ")")};
  }
}

// The rank of the stage at the other end of a send/recv, for tokens that
// leave the peer out.
std::optional<int> default_peer(const Action& a, const Schedule& s) {
  const int other = a.neighbour_stage(s.num_stages());
  if (other < 0) return std::nullopt;
  return s.stage_ranks[static_cast<std::size_t>(other)];
}

}  // namespace

Action parse_action(std::string_view token) {
  try {
    Action a = parse_token(token, 1);
    DTRAIN_CHECK_ARG(!a.is_communication() || a.peer != kNoPeer, "'", token,
                     "': name the peer rank (", a.is_send() ? "sendF0.1>1" : "recvF1.1<0", ")");
    return a;
  } catch (const TextError& e) {
    DTRAIN_THROW(InvalidArgument, e.message);
  }
}

std::string to_text(const Schedule& schedule) {
  std::ostringstream out;
  out << "pipeline ranks=" << schedule.num_ranks << " microbatches=" << schedule.num_microbatches
      << " stages=" << schedule.num_stages();
  bool loop = schedule.num_stages() % std::max(schedule.num_ranks, 1) == 0;
  for (int s = 0; loop && s < schedule.num_stages(); ++s) {
    loop = schedule.stage_ranks[static_cast<std::size_t>(s)] == s % schedule.num_ranks;
  }
  if (!loop) {
    out << " placement=";
    for (int s = 0; s < schedule.num_stages(); ++s) {
      out << (s ? "|" : "") << schedule.stage_ranks[static_cast<std::size_t>(s)];
    }
  }
  if (!schedule.name.empty()) out << " name=" << schedule.name;
  out << '\n';
  for (std::size_t r = 0; r < schedule.actions.size(); ++r) {
    out << r << ':';
    for (const Action& a : schedule.actions[r]) out << ' ' << a.to_string();
    out << '\n';
  }
  return out.str();
}

Schedule parse_schedule(std::string_view text, const std::string& source) {
  Schedule schedule;
  bool have_header = false;
  std::size_t line_number = 0;
  std::size_t line_begin = 0;
  while (line_begin <= text.size()) {
    std::size_t line_end = text.find('\n', line_begin);
    if (line_end == std::string_view::npos) line_end = text.size();
    std::string_view line = text.substr(line_begin, line_end - line_begin);
    ++line_number;
    const std::size_t next = line_end + 1;
    if (const std::size_t hash = line.find('#'); hash != std::string_view::npos) {
      line = line.substr(0, hash);
    }
    try {
      std::size_t pos = 0;
      while (pos < line.size() && is_separator(line[pos])) ++pos;
      if (pos < line.size()) {
        if (line.substr(pos, 8) == "pipeline" &&
            (pos + 8 == line.size() || is_separator(line[pos + 8]))) {
          if (have_header) throw TextError{pos + 1, "a second header line"};
          Header header = parse_header(line, pos);
          std::vector<int> placement = parse_placement(header);
          schedule.name = header.name;
          schedule.num_ranks = header.ranks;
          schedule.num_microbatches = header.microbatches;
          schedule.stage_ranks = std::move(placement);
          schedule.actions.assign(static_cast<std::size_t>(header.ranks), {});
          have_header = true;
        } else {
          if (!have_header) {
            throw TextError{pos + 1,
                            "expected the header 'pipeline ranks=<p> microbatches=<m>' before "
                            "the first rank row"};
          }
          const std::size_t rank_column = pos + 1;
          const std::optional<int> rank = read_number(line, &pos);
          if (!rank || pos >= line.size() || (line[pos] != ':' && line[pos] != ',')) {
            throw TextError{rank_column,
                            "a rank row starts with the rank number and ':' (0: F0.0 ...)"};
          }
          if (*rank >= schedule.num_ranks) {
            throw TextError{rank_column, detail::str_cat("rank ", *rank, " is out of range (ranks=",
                                                         schedule.num_ranks, ")")};
          }
          ++pos;
          auto& list = schedule.actions[static_cast<std::size_t>(*rank)];
          while (pos < line.size()) {
            while (pos < line.size() && is_separator(line[pos])) ++pos;
            if (pos >= line.size()) break;
            const std::size_t begin = pos;
            while (pos < line.size() && !is_separator(line[pos])) ++pos;
            Action a = parse_token(line.substr(begin, pos - begin), begin + 1);
            check_ranges(a, schedule, begin + 1);
            if (a.is_communication() && a.peer == kNoPeer) {
              const std::optional<int> peer = default_peer(a, schedule);
              if (!peer) {
                throw TextError{
                    begin + 1,
                    detail::str_cat("'", a.to_string().substr(0, a.to_string().find_first_of("<>")),
                                    "': stage ", a.stage, " has no neighbour in that direction")};
              }
              a.peer = *peer;
            }
            list.push_back(a);
          }
        }
      }
    } catch (const TextError& e) {
      DTRAIN_THROW(InvalidArgument, source, ':', line_number, ':', e.column, ": ", e.message);
    }
    if (line_end == text.size()) break;
    line_begin = next;
  }
  DTRAIN_CHECK_ARG(have_header, source,
                   ": no header line; a schedule starts with 'pipeline ranks=<p> "
                   "microbatches=<m>'");
  return schedule;
}

}  // namespace dtrain::parallel::pipeline
