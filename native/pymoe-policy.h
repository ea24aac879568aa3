// Eviction policies: which cached expert gives up its slot.
//
// A policy is a pure function of the candidates' bookkeeping; the cache owns
// that bookkeeping and asks the policy only when a slot must be freed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pymoe {

// what the cache knows about one occupied, evictable slot
struct slot_view {
    int32_t  layer;
    int32_t  expert;
    uint64_t last_use; // step counter of its last use (larger: more recent)
    uint64_t uses;     // pairs routed to this expert since load
    double   profile;  // its weight in a recorded usage profile (0 when none)
    uint64_t hi_uses = 0; // of those, pairs that wanted high precision (gate weight at or above the threshold)
};

// weights of the multidimensional policy's score (HOBBIT: recency, frequency, precision)
struct multidim_weights {
    double recency   = 1.0;
    double frequency = 1.0;
    double precision = 1.0;
};

class eviction_policy {
  public:
    virtual ~eviction_policy() = default;

    virtual const char * name() const = 0;

    // Index into `cands` (n > 0) of the slot to evict.
    virtual size_t pick_victim(const slot_view * cands, size_t n) const = 0;

    // Whether a missed expert may take a slot at all; a static hot set keeps
    // its slots and serves the other experts from where they live.
    virtual bool admits_on_miss() const { return true; }
};

// "lru": least recently used. "lfu": least frequently used, ties by recency.
// "static": the hot set of a profile, loaded at start and never evicted.
// "multidim": the smallest w_r * recency + w_f * frequency + w_p * precision,
//   each normalised over the candidates to [0, 1] (recency: last use scaled
//   between the oldest and the newest candidate; frequency: uses / most uses;
//   precision: the share of uses that wanted high precision).
// Throws std::invalid_argument for another name.
std::unique_ptr<eviction_policy> make_eviction_policy(const std::string & name, const multidim_weights & w = {});

std::vector<std::string> eviction_policy_names();

}  // namespace pymoe
