// Thread teams: with more threads than directions, each direction's recurrence runs on a team of
// threads. A member owns a slice of hidden units with all their gates, so the cell math stays local
// to it, and runs every step's product for its slice's columns only (its slice of W_hh stays in its
// own cache); the team meets once per step, where the next step's product reads what every member
// wrote (forward: h_t; backward: the gate gradients). What one member writes while another may
// still read the previous step's values is double-buffered by the step's parity.
//
// The directions run at once, each on a team of half the threads, or in turn, each on a team of
// every thread: in turn where both directions' W_hh together would take more than half the
// last-level cache and the batch is small (each step streams all of a direction's W_hh for few
// rows; run together, two directions' weights evict each other and every step reads them from
// memory; in turn, one direction's stay in cache), which also gives a 2-thread machine teams. With
// more rows the products reuse each weight enough that one thread per direction without a barrier
// a step is faster.
//
// The team size comes from the shape and torch.get_num_threads(): no more members than the threads
// (in turn) or half of them (at once), than slices of kMinUnits units, or than the step's product
// can feed with at least kMinMultiplyAdds each (below that, the wait at each step costs more than
// the member's share). BIRNN_FAST_CPU_TEAM=N asks for N members regardless of the shape (tests,
// benchmarks), still within the threads and one slice of kUnitGrain units each;
// BIRNN_FAST_CPU_IN_TURN=1 / 0 forces the directions in turn / at once.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace birnn_fast::cpu {

constexpr int64_t kMinUnits = 16;
constexpr int64_t kMinMultiplyAdds = int64_t{1} << 18;
constexpr int64_t kUnitGrain = 8;  // slices start on whole vectors of the cell math
constexpr int64_t kInTurnMaxBatch = 16;

// Bytes of the last-level cache instance this CPU shares (Linux's sysfs, as lscpu reads it: sysconf
// reports the whole package's L3 on some CPUs and VMs, e.g. 256 MiB for eight 32 MiB slices); 32 MiB
// where neither can tell.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t level = 0, size = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
      int64_t this_level = 0, this_size = 0;
      std::string type, unit;
      if (!(level_file >> this_level) || !(type_file >> type) || !(size_file >> this_size)) {
        continue;
      }
      size_file >> unit;  // "32768K"
      this_size <<= unit == "M" ? 20 : unit == "K" ? 10 : 0;
      if (type != "Instruction" && this_level > level) {
        level = this_level;
        size = this_size;
      }
    }
    if (size > 0) {
      return size;
    }
    const long reported = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{32} << 20;
  }();
  return bytes;
}

struct TeamPlan {
  int64_t members = 1;   // per direction's team (1: no team)
  bool in_turn = false;  // the directions one after the other, each on every member
};

// The teams of a layer of B rows, H units, state width P and `weight_bytes` of W_hh per direction
// as its products read them. A projected LSTM runs without teams: its h_t = W_hr r_t needs every
// unit's r_t.
inline TeamPlan team_plan(int64_t batch, int64_t hidden, int64_t state, int64_t gates, bool projected,
                          int64_t weight_bytes) {
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || projected || at::in_parallel_region()) {
    return {};
  }
  bool in_turn = batch <= kInTurnMaxBatch && 2 * weight_bytes > last_level_cache_bytes() / 2;
  if (const char* forced = std::getenv("BIRNN_FAST_CPU_IN_TURN")) {
    in_turn = std::atoi(forced) != 0;
  }
  const int64_t most = in_turn ? threads : threads / 2;
  int64_t members;
  if (const char* forced = std::getenv("BIRNN_FAST_CPU_TEAM")) {
    members = std::min({static_cast<int64_t>(std::atoll(forced)), most, (hidden + kUnitGrain - 1) / kUnitGrain});
  } else {
    const int64_t by_work = batch * state * gates * hidden / kMinMultiplyAdds;
    members = std::min({most, hidden / kMinUnits, by_work});
  }
  if (members < 2) {
    return {};
  }
  return {members, in_turn};
}

// Units [first, first + count) of member `member` of `members` (count may be 0 for the last ones).
struct UnitSlice {
  int64_t first, count;
};

inline UnitSlice unit_slice(int64_t hidden, int64_t member, int64_t members) {
  const int64_t per_member = ((hidden + members - 1) / members + kUnitGrain - 1) / kUnitGrain * kUnitGrain;
  const int64_t first = std::min(hidden, member * per_member);
  return {first, std::min(hidden, first + per_member) - first};
}

// A reusable spin barrier for the members of one team: steps last microseconds, too short to sleep
// on; a waiter yields its core after a while, so that an oversubscribed team still progresses.
class TeamBarrier {
 public:
  void resize(int64_t size) { size_ = size; }

  void wait() {
    if (size_ <= 1) {
      return;
    }
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins >= kSpins) {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpins = 1 << 12;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  int64_t size_ = 1;
};

// Runs fn(direction, member, members, barrier) for both directions' teams of up to plan.members
// threads each: all at once, or each thread through direction 0 then direction 1 (in turn: the
// directions share no buffer, so a member may start direction 1 while others finish direction 0).
// OpenMP may start fewer threads than asked (nested in another parallel region, or a capped pool):
// the teams then shrink to what started, down to one thread running both directions in turn, since
// a member waiting for one that never starts would wait for ever.
template <typename Fn>
void run_teams(TeamPlan plan, Fn&& fn) {
  TeamBarrier barriers[2];
#ifdef _OPENMP
  const int64_t teams_at_once = plan.in_turn ? 1 : 2;
#pragma omp parallel num_threads(static_cast<int>(teams_at_once * plan.members))
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t started = std::max<int64_t>(1, std::min(plan.members, threads / teams_at_once));
#pragma omp single
    {
      barriers[0].resize(started);
      barriers[1].resize(started);
    }
    if (threads == 1 || (plan.in_turn && thread < started)) {
      fn(0, thread, started, barriers[0]);
      fn(1, thread, started, barriers[1]);
    } else if (!plan.in_turn && thread < 2 * started) {
      const int64_t direction = thread / started;
      fn(direction, thread % started, started, barriers[direction]);
    }
  }
#else
  fn(0, 0, 1, barriers[0]);
  fn(1, 0, 1, barriers[1]);
#endif
}

}  // namespace birnn_fast::cpu
