// The expert cache: slot pools in the fast tier with a byte budget that holds.
//
// Layers whose experts have the same format (type and shape of every
// projection) and run on the same device share one pool: per projection a 3-D
// tensor [n_in, n_out, n_slots] in that device's buffer, so a slot index is a
// valid mul_mat_id id.
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

// When (il, e) is used next after `step` (a step number of the run that is
// being replayed), or k_no_next_use. Only an offline simulation, which has the
// whole trace, has one; an offline policy ("belady") reads it through slot_view.
class next_use_oracle {
  public:
    virtual ~next_use_oracle() = default;
    virtual uint64_t next_use(int32_t il, int32_t e, uint64_t step) const = 0;
};

struct pool_class {
    std::vector<int32_t> layers;                        // the layers that share this pool
    ggml_backend_buffer_type_t buft = nullptr;          // where its slots live (the device its layers run on)
    bool                 host       = true;             // slots are host memory (memcpy) or device memory (tensor_set)
    int32_t              n_slots    = 0;
    uint64_t             slot_bytes = 0;                // one expert, all projections
    ggml_tensor *        tensors[PROJ_COUNT] = {};      // [n_in, n_out, n_slots]; null for absent projections

    // per slot
    std::vector<int32_t>  owner_layer;                  // -1: free
    std::vector<int32_t>  owner_expert;
    std::vector<uint64_t> last_use;                     // step of the last use
    std::vector<uint64_t> pinned_step;                  // used by the step in progress: not evictable
    std::vector<uint8_t>  ready;                        // 0 while a background load fills it: not yet a hit
};

class expert_cache {
  public:
    // Splits `budget` bytes over the pools of `layers` (an expert_store's, or a
    // simulator's) so that every class gets the same share of its experts, and
    // allocates each pool in the buffer type of its layers' device
    // (`layer_buft[il]`; one entry for all layers when it has size 1). A class
    // whose share is below one slot gets none. `profile` ([n_layer * n_expert])
    // feeds the static hot set. With allocate = false only the split is computed
    // (pymoe info --expert-budget, the simulator). per_layer: a pool per layer
    // instead of per format (each layer keeps its share).
    expert_cache(const std::vector<expert_layer> & layers, int32_t n_expert, uint64_t budget,
                 const std::vector<ggml_backend_buffer_type_t> & layer_buft, std::unique_ptr<eviction_policy> policy,
                 std::vector<double> profile, bool allocate = true, bool per_layer = false);

    const eviction_policy & policy() const { return *policy_; }
    int32_t  class_of(int32_t il) const { return il >= 0 && il < (int32_t) class_of_.size() ? class_of_[il] : -1; }
    const pool_class & cls(int32_t c) const { return classes_[c]; }
    int32_t  n_classes() const { return (int32_t) classes_.size(); }
    int32_t  n_slots() const;
    uint64_t allocated_bytes() const;  // the pools' backend buffers: this is what the budget bounds
    // bytes allocated in one buffer type (a device's share of the budget)
    uint64_t allocated_bytes(ggml_backend_buffer_type_t buft) const;
    uint64_t planned_bytes() const { return planned_bytes_; }
    uint64_t budget() const { return budget_; }

    // slot of (il, e) when its bytes are in place, or -1
    int32_t lookup(int32_t il, int32_t e) const {
        const int32_t s = slot_of_[index(il, e)];
        return s >= 0 && classes_[class_of_[il]].ready[s] ? s : -1;
    }
    // slot of (il, e) in any state: in place, or being filled in the background; or -1
    int32_t holds(int32_t il, int32_t e) const { return slot_of_[index(il, e)]; }

    // Marks a cached expert used by `step` (recency, and pinned for the step).
    void touch(int32_t il, int32_t e, uint64_t step);
    // Counts pairs routed to an expert at `step` (frequency), and those of them
    // that wanted high precision (the multidimensional policy's precision term).
    void count(int32_t il, int32_t e, uint64_t pairs, uint64_t hi_pairs, uint64_t step);
    uint64_t uses(int32_t il, int32_t e) const { return uses_[index(il, e)]; }
    // Recent frequency, for admission: pairs routed to (il, e), each weighing
    // half as much every `half_life` steps (set_half_life; 0: no decay).
    double recent(int32_t il, int32_t e, uint64_t step) const;
    void   set_half_life(double steps) { half_life_ = steps; }

    // The future, for an offline policy (the simulator's; null: none). The
    // oracle must outlive the cache's use of it.
    void set_future(const next_use_oracle * future) { future_ = future; }
    // Layer il's step chose these pairs (expert ids, weights relative to each
    // token's top-k sum): what a predicting policy learns from (routing_model).
    void observe(int32_t il, const int32_t * experts, const float * weights, int64_t n_pairs) {
        if (model_) {
            model_->observe(il, experts, weights, n_pairs);
        }
    }
    // What the policy sees of (il, e) at `step`, cached or not.
    slot_view view(int32_t il, int32_t e, uint64_t step) const;
    // Background admission: whether the policy would give (il, e) the slot of
    // (victim_layer, victim_expert) (eviction_policy::admit).
    bool admits(int32_t il, int32_t e, int32_t victim_layer, int32_t victim_expert, uint64_t step) const;

    // Frees the slot of (il, e), if it has one (a low-precision copy upgraded to high).
    void release(int32_t il, int32_t e);

    // A slot being filled in the background is not evictable until unpinned.
    void pin(int32_t il, int32_t e);
    void unpin(int32_t il, int32_t e);

    // Gives (il, e) a slot of its class, evicting an expert not pinned by
    // `step` if needed; the slot is pinned for the step. Returns the slot, or
    // -1 when every slot is pinned. *evicted is set when an expert lost its slot.
    // ready = false: a background load fills it; it is no hit until publish().
    int32_t assign(int32_t il, int32_t e, uint64_t step, bool * evicted, bool ready = true);
    // A background load of (il, e) completed: its slot becomes a hit (and evictable).
    void    publish(int32_t il, int32_t e);
    // The slot assign() would give (il, e) now: a free one, else the policy's
    // victim among those not pinned by `step`; -1 when none. *victim_layer /
    // *victim_expert: who holds it (-1 when free). Nothing changes.
    int32_t candidate_slot(int32_t il, uint64_t step, int32_t * victim_layer, int32_t * victim_expert) const;

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
    std::vector<double>              recent_;    // [n_layer * n_expert] decayed pairs, as of recent_step_
    std::vector<uint64_t>            recent_step_;
    double                           half_life_ = 0.0;
    const next_use_oracle *          future_    = nullptr;
    std::unique_ptr<routing_model>   model_;  // when the policy wants predictions
    std::vector<ggml_context_ptr>        ctx_;  // one per buffer type
    std::vector<ggml_backend_buffer_ptr> buf_;
    uint64_t                             planned_bytes_ = 0;
};

}  // namespace pymoe
