// The expert cache: slot pools in the fast tier with a byte budget that holds.
//
// Layers whose experts have the same format (type and shape of every
// projection) share one pool: per projection a 3-D tensor [n_in, n_out,
// n_slots] in one backend buffer, so a slot index is a valid mul_mat_id id.
// A global (layer, expert) -> slot map says what each slot holds.
#pragma once

#include "pymoe-expert-store.h"
#include "pymoe-policy.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace pymoe {

struct pool_class {
    std::vector<int32_t> layers;                        // the layers that share this pool
    int32_t              n_slots    = 0;
    uint64_t             slot_bytes = 0;                // one expert, all projections
    ggml_tensor *        tensors[PROJ_COUNT] = {};      // [n_in, n_out, n_slots]; null for absent projections

    // per slot
    std::vector<int32_t>  owner_layer;                  // -1: free
    std::vector<int32_t>  owner_expert;
    std::vector<uint64_t> last_use;                     // step of the last use
    std::vector<uint64_t> pinned_step;                  // used by the step in progress: not evictable
};

class expert_cache {
  public:
    // Splits `budget` bytes over the pools of `layers` (an expert_store's, or a
    // simulator's) so that every class gets the same share of its experts, and
    // allocates them in `buft`. A class whose share is below one slot gets
    // none. `profile` ([n_layer * n_expert]) feeds the static hot set.
    // With allocate = false only the split is computed (pymoe info --expert-budget, the simulator).
    // per_layer: a pool per layer instead of per format (each layer keeps its share).
    expert_cache(const std::vector<expert_layer> & layers, int32_t n_expert, uint64_t budget,
                 ggml_backend_buffer_type_t buft, std::unique_ptr<eviction_policy> policy,
                 std::vector<double> profile, bool allocate = true, bool per_layer = false);

    const eviction_policy & policy() const { return *policy_; }
    int32_t  class_of(int32_t il) const { return il >= 0 && il < (int32_t) class_of_.size() ? class_of_[il] : -1; }
    const pool_class & cls(int32_t c) const { return classes_[c]; }
    int32_t  n_classes() const { return (int32_t) classes_.size(); }
    int32_t  n_slots() const;
    uint64_t allocated_bytes() const;  // the pools' backend buffer: this is what the budget bounds
    uint64_t planned_bytes() const { return planned_bytes_; }
    uint64_t budget() const { return budget_; }

    // slot of (il, e), or -1
    int32_t lookup(int32_t il, int32_t e) const { return slot_of_[index(il, e)]; }

    // Marks a cached expert used by `step` (recency, and pinned for the step).
    void touch(int32_t il, int32_t e, uint64_t step);
    // Counts pairs routed to an expert (frequency), and those of them that
    // wanted high precision (the multidimensional policy's precision term).
    void count(int32_t il, int32_t e, uint64_t pairs, uint64_t hi_pairs) {
        uses_[index(il, e)] += pairs;
        hi_uses_[index(il, e)] += hi_pairs;
    }
    uint64_t uses(int32_t il, int32_t e) const { return uses_[index(il, e)]; }

    // Frees the slot of (il, e), if it has one (a low-precision copy upgraded to high).
    void release(int32_t il, int32_t e);

    // A slot being filled in the background is not evictable until unpinned.
    void pin(int32_t il, int32_t e);
    void unpin(int32_t il, int32_t e);

    // Gives (il, e) a slot of its class, evicting an expert not pinned by
    // `step` if needed; the slot is pinned for the step. Returns the slot, or
    // -1 when every slot is pinned. *evicted is set when an expert lost its slot.
    int32_t assign(int32_t il, int32_t e, uint64_t step, bool * evicted);

    // Where expert bytes go when they are read into `slot` of class `c`, in
    // the order of the layer's projections.
    std::vector<read_dst> slot_dst(int32_t c, int32_t slot, const expert_layer & layer) const;

    // The hot set of the static policy: per class, the experts with the
    // largest profile weight, as many as there are slots.
    std::vector<std::pair<int32_t, int32_t>> hot_set() const;

    const std::vector<double> & profile() const { return profile_; }

  private:
    size_t index(int32_t il, int32_t e) const { return (size_t) il * (size_t) n_expert_ + (size_t) e; }

    int32_t                          n_expert_ = 0;
    uint64_t                         budget_   = 0;
    std::unique_ptr<eviction_policy> policy_;
    std::vector<double>              profile_;
    std::vector<pool_class>          classes_;
    std::vector<int32_t>             class_of_;  // [n_layer]
    std::vector<int32_t>             slot_of_;   // [n_layer * n_expert]
    std::vector<uint64_t>            uses_;      // [n_layer * n_expert]
    std::vector<uint64_t>            hi_uses_;   // [n_layer * n_expert]
    ggml_context_ptr                 ctx_;
    ggml_backend_buffer_ptr          buf_;
    bool                             host_          = true;
    uint64_t                         planned_bytes_ = 0;
};

}  // namespace pymoe
