// The heartbeat between ranks; the protocol is described in heartbeat.h.

#include "src/runtime/heartbeat.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/error.h"

namespace dtrain::detail {
namespace {

using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;

constexpr std::uint32_t kMagic = 0x64744842;  // "dtHB"
enum Kind : std::uint32_t { kBeat = 1, kLost = 2, kBye = 3 };
constexpr int kMaxAddresses = 8;
constexpr int kRanksPerNotice = 64;
constexpr int kNoticeRounds = 3;

struct Datagram {
  std::uint32_t magic = kMagic;
  std::uint32_t kind = kBeat;
  std::uint64_t job = 0;
  std::int32_t from = -1;
  std::int32_t count = 0;  // kLost: ranks[0..count)
  std::int32_t ranks[kRanksPerNotice] = {};
};

// What each rank tells the others at the start (all-gathered as bytes).
struct Record {
  char host[64];
  std::uint64_t job;                       // rank 0's is the job's token
  std::uint32_t addresses[kMaxAddresses];  // IPv4, network byte order
  std::uint32_t masks[kMaxAddresses];
  std::uint16_t port;  // network byte order
  std::uint8_t address_count;
  std::uint8_t ok;  // the socket is open
};

std::string hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "?";
  return name;
}

// IPv4 addresses of the interfaces that are up, loopback excluded.
void list_addresses(Record& record) {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return;
  for (ifaddrs* a = list; a != nullptr && record.address_count < kMaxAddresses; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    if ((a->ifa_flags & IFF_UP) == 0 || (a->ifa_flags & IFF_LOOPBACK) != 0) continue;
    record.addresses[record.address_count] =
        reinterpret_cast<const sockaddr_in*>(a->ifa_addr)->sin_addr.s_addr;
    record.masks[record.address_count] =
        a->ifa_netmask ? reinterpret_cast<const sockaddr_in*>(a->ifa_netmask)->sin_addr.s_addr
                       : 0xffffffffu;
    ++record.address_count;
  }
  ::freeifaddrs(list);
}

std::string format_address(const sockaddr_in& a) {
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &a.sin_addr, text, sizeof(text));
  return std::string(text) + ":" + std::to_string(ntohs(a.sin_port));
}

std::string seconds_text(Clock::duration d) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f s", std::chrono::duration<double>(d).count());
  return text;
}

}  // namespace

struct Heartbeat::State {
  HeartbeatOptions options;
  int rank = 0;
  int size = 1;
  int fd = -1;
  int wake[2] = {-1, -1};  // a pipe: the destructor wakes the thread through it
  std::uint64_t job = 0;
  std::vector<std::string> hosts;    // by world rank
  std::vector<sockaddr_in> targets;  // where each rank listens; port 0: unreachable
  std::vector<int> neighbours;       // distinct, never this rank
  Clock::time_point started;
  std::vector<Clock::time_point> last_heard;
  std::vector<char> heard, departed, lost, warned;
  std::vector<int> noticed_by;  // who reported each lost rank
  bool any_loss = false;
  Clock::time_point first_loss, failed_at;
  int notice_rounds = kNoticeRounds;  // none to send until this rank notices a loss itself
  Clock::time_point next_notice;
  std::atomic<bool> stop{false};
  std::thread thread;

  void send(int peer, const Datagram& d) const {
    const sockaddr_in& to = targets[static_cast<std::size_t>(peer)];
    if (to.sin_port == 0) return;
    const std::size_t bytes = offsetof(Datagram, ranks) + sizeof(std::int32_t) * d.count;
    // Best effort: a datagram that cannot leave (no route, a full buffer) is
    // a missed beat, which is what the receiver watches for.
    (void)::sendto(fd, &d, bytes, MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
  }

  Datagram datagram(Kind kind) const {
    Datagram d;
    d.kind = kind;
    d.job = job;
    d.from = rank;
    return d;
  }

  void send_notices() const {
    std::vector<int> ranks;
    for (int r = 0; r < size; ++r) {
      if (lost[static_cast<std::size_t>(r)]) ranks.push_back(r);
    }
    for (std::size_t begin = 0; begin < ranks.size(); begin += kRanksPerNotice) {
      Datagram d = datagram(kLost);
      d.count =
          static_cast<std::int32_t>(std::min<std::size_t>(kRanksPerNotice, ranks.size() - begin));
      for (int i = 0; i < d.count; ++i) d.ranks[i] = ranks[begin + static_cast<std::size_t>(i)];
      for (int peer = 0; peer < size; ++peer) {
        if (peer != rank && !lost[static_cast<std::size_t>(peer)]) send(peer, d);
      }
    }
  }

  void mark_lost(int r, int by, Clock::time_point now) {
    if (r == rank || r < 0 || r >= size || lost[static_cast<std::size_t>(r)]) return;
    lost[static_cast<std::size_t>(r)] = 1;
    noticed_by[static_cast<std::size_t>(r)] = by;
    if (!any_loss) {
      any_loss = true;
      first_loss = now;
    }
    if (by == rank) {  // tell everyone, again over the next intervals
      notice_rounds = 0;
      next_notice = now;
    }
  }

  // "lost contact with ranks [2, 3] on host h2 and ranks [5] on host h3
  // (no heartbeat for more than 4 s; noticed by ranks [1, 4])"
  std::string describe() const {
    std::vector<std::string> order;
    for (int r = 0; r < size; ++r) {
      const std::string& h = hosts[static_cast<std::size_t>(r)];
      if (lost[static_cast<std::size_t>(r)] &&
          std::find(order.begin(), order.end(), h) == order.end())
        order.push_back(h);
    }
    std::ostringstream out;
    out << "lost contact with ";
    for (std::size_t i = 0; i < order.size(); ++i) {
      out << (i ? " and " : "") << "ranks [";
      bool first = true;
      for (int r = 0; r < size; ++r) {
        if (!lost[static_cast<std::size_t>(r)] || hosts[static_cast<std::size_t>(r)] != order[i])
          continue;
        out << (first ? "" : ", ") << r;
        first = false;
      }
      out << "] on host " << order[i];
    }
    std::vector<int> by;
    for (int r = 0; r < size; ++r) {
      const int b = noticed_by[static_cast<std::size_t>(r)];
      if (lost[static_cast<std::size_t>(r)] && std::find(by.begin(), by.end(), b) == by.end())
        by.push_back(b);
    }
    std::sort(by.begin(), by.end());
    out << " (no heartbeat for more than " << seconds_text(options.timeout)
        << "; noticed by ranks [";
    for (std::size_t i = 0; i < by.size(); ++i) out << (i ? ", " : "") << by[i];
    out << "])";
    return out.str();
  }
};

Heartbeat::Heartbeat(int rank, int size, const HeartbeatOptions& options)
    : health_(std::make_shared<collectives::detail::PeerHealth>()),
      state_(std::make_unique<State>()) {
  options.validate();
  State& s = *state_;
  s.options = options;
  s.rank = rank;
  s.size = size;
  if (s.size == 1 || options.interval.count() == 0) return;

  Record mine{};
  const std::string host = hostname();
  std::strncpy(mine.host, host.c_str(), sizeof(mine.host) - 1);
  std::random_device random;
  mine.job = (std::uint64_t{random()} << 32) ^ random();
  list_addresses(mine);
  s.fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  sockaddr_in any{};
  any.sin_family = AF_INET;
  any.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t length = sizeof(any);
  const bool ok = s.fd >= 0 && ::bind(s.fd, reinterpret_cast<sockaddr*>(&any), sizeof(any)) == 0 &&
                  ::getsockname(s.fd, reinterpret_cast<sockaddr*>(&any), &length) == 0 &&
                  ::pipe2(s.wake, O_CLOEXEC | O_NONBLOCK) == 0;
  const int error = ok ? 0 : errno;
  mine.port = any.sin_port;
  mine.ok = ok ? 1 : 0;

  std::vector<Record> all(static_cast<std::size_t>(s.size));
  collectives::detail::world_all_gather(&mine, sizeof(Record), all.data(),
                                        "the heartbeat's exchange of addresses");
  int failed = 0;
  for (std::size_t r = 0; r < all.size(); ++r) failed += all[r].ok ? 0 : 1;
  if (failed > 0) {
    if (!ok || (s.rank == 0 && failed > 0)) {
      std::fprintf(
          stderr,
          "[dtrain rank %d] warning: the heartbeat is off: %d rank(s) could not open a UDP "
          "socket%s%s; a dead host is then noticed only by the collectives' timeouts\n",
          s.rank, failed, ok ? "" : " (this one: ", ok ? "" : std::strerror(error));
    }
    if (s.fd >= 0) ::close(s.fd);
    for (int& w : s.wake) {
      if (w >= 0) ::close(w);
      w = -1;
    }
    s.fd = -1;
    return;
  }

  s.job = all[0].job;
  s.hosts.resize(all.size());
  s.targets.assign(all.size(), sockaddr_in{});
  for (std::size_t r = 0; r < all.size(); ++r) {
    const Record& peer = all[r];
    s.hosts[r] = std::string(peer.host, strnlen(peer.host, sizeof(peer.host)));
    sockaddr_in& to = s.targets[r];
    to.sin_family = AF_INET;
    to.sin_port = peer.port;
    if (s.hosts[r] == host) {
      to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      continue;
    }
    // The peer's first address on a subnet of ours; else its first address.
    int pick = -1;
    for (int i = 0; i < peer.address_count && pick < 0; ++i) {
      for (int j = 0; j < mine.address_count; ++j) {
        if (peer.addresses[i] != mine.addresses[j] &&
            (peer.addresses[i] & mine.masks[j]) == (mine.addresses[j] & mine.masks[j])) {
          pick = i;
          break;
        }
      }
    }
    if (pick < 0 && peer.address_count > 0) pick = 0;
    if (pick < 0) {
      to.sin_port = 0;
    } else {
      to.sin_addr.s_addr = peer.addresses[pick];
    }
  }
  const int before = (s.rank + s.size - 1) % s.size;
  const int after = (s.rank + 1) % s.size;
  s.neighbours.push_back(before);
  if (after != before) s.neighbours.push_back(after);
  const std::size_t n = all.size();
  s.last_heard.assign(n, Clock::time_point{});
  s.heard.assign(n, 0);
  s.departed.assign(n, 0);
  s.lost.assign(n, 0);
  s.warned.assign(n, 0);
  s.noticed_by.assign(n, -1);
  s.started = Clock::now();
  s.thread = std::thread([this] { loop(); });
}

Heartbeat::~Heartbeat() {
  State& s = *state_;
  if (!s.thread.joinable()) return;
  s.stop.store(true);
  const char byte = 1;
  if (::write(s.wake[1], &byte, 1) != 1) {
    // The loop also wakes on its poll timeout and then sees stop.
  }
  s.thread.join();
  const Datagram bye = s.datagram(kBye);
  for (int peer : s.neighbours) s.send(peer, bye);
  ::close(s.fd);
  ::close(s.wake[0]);
  ::close(s.wake[1]);
}

void Heartbeat::loop() {
  State& s = *state_;
  const Millis interval = s.options.interval;
  const Millis grace = std::max<Millis>(std::chrono::seconds(2), 4 * interval);
  Clock::time_point next_beat = Clock::now();
  const Datagram beat = s.datagram(kBeat);
  while (!s.stop.load()) {
    Clock::time_point now = Clock::now();
    if (now >= next_beat) {
      for (int peer : s.neighbours) s.send(peer, beat);
      next_beat = now + interval;
    }
    for (int peer : s.neighbours) {
      const auto p = static_cast<std::size_t>(peer);
      if (s.lost[p] || s.departed[p]) continue;
      if (!s.heard[p]) {
        if (!s.warned[p] && now - s.started > s.options.timeout) {
          s.warned[p] = 1;
          std::fprintf(stderr,
                       "[dtrain rank %d] warning: no heartbeat has come from rank %d (host %s, "
                       "%s) since the start; it is not watched, and if it dies only the "
                       "collectives' timeouts will notice (are UDP datagrams between the hosts "
                       "blocked?)\n",
                       s.rank, peer, s.hosts[p].c_str(), format_address(s.targets[p]).c_str());
        }
        continue;
      }
      if (now - s.last_heard[p] > s.options.timeout) s.mark_lost(peer, s.rank, now);
    }
    if (s.notice_rounds < kNoticeRounds && now >= s.next_notice) {
      s.send_notices();
      ++s.notice_rounds;
      s.next_notice = now + interval;
    }
    if (s.any_loss && !health_->failed() && now >= s.first_loss + interval) {
      health_->fail(s.describe());
      s.failed_at = now;
    }
    if (health_->failed() && now >= s.failed_at + grace) {
      Runtime::abort_job(1, "heartbeat: " + health_->failure() +
                                "; this rank was in no "
                                "collective that could report it, so the heartbeat ends the job");
    }

    // Sleep until the next thing to do, or a datagram, or the destructor.
    Clock::time_point wake_at = next_beat;
    if (s.notice_rounds < kNoticeRounds) wake_at = std::min(wake_at, s.next_notice);
    if (s.any_loss && !health_->failed()) wake_at = std::min(wake_at, s.first_loss + interval);
    if (health_->failed()) wake_at = std::min(wake_at, s.failed_at + grace);
    const auto wait = std::chrono::duration_cast<Millis>(wake_at - Clock::now()).count() + 1;
    pollfd fds[2] = {{s.fd, POLLIN, 0}, {s.wake[0], POLLIN, 0}};
    ::poll(fds, 2, static_cast<int>(std::clamp<long long>(wait, 0, interval.count())));
    now = Clock::now();
    Datagram d;
    sockaddr_in from{};
    while (true) {
      socklen_t from_length = sizeof(from);
      const ssize_t got =
          ::recvfrom(s.fd, &d, sizeof(d), 0, reinterpret_cast<sockaddr*>(&from), &from_length);
      if (got < 0) break;
      if (static_cast<std::size_t>(got) < offsetof(Datagram, ranks) || d.magic != kMagic ||
          d.job != s.job || d.from < 0 || d.from >= s.size || d.count < 0 ||
          d.count > kRanksPerNotice ||
          static_cast<std::size_t>(got) <
              offsetof(Datagram, ranks) + sizeof(std::int32_t) * d.count)
        continue;  // not ours (another job, a stray datagram)
      const auto p = static_cast<std::size_t>(d.from);
      if (d.kind == kBeat) {
        s.last_heard[p] = now;
        s.heard[p] = 1;
      } else if (d.kind == kBye) {
        s.departed[p] = 1;
      } else if (d.kind == kLost) {
        for (int i = 0; i < d.count; ++i) s.mark_lost(d.ranks[i], d.from, now);
      }
    }
  }
}

}  // namespace dtrain::detail
