// One MoE layer's step, as the engine and the simulator both run it: the
// routing grouped by expert, the plan (plan_layer), the slots it takes, and
// the experts admitted into the cache in the background. The engine adds the
// reads, uploads and id tensors; the simulator its modelled time. Neither has
// its own copy of this logic.
#pragma once

#include "pymoe-expert-cache.h"
#include "pymoe-planner.h"

#include <cstdint>
#include <vector>

namespace pymoe {

struct step_config {
    bool       admit        = true;  // the policy lets a miss take a slot (false: a static hot set)
    bool       assist       = true;  // a miss may be computed where its weights are (the cost model decides)
    float      lo_threshold = 0.0f;  // relative gate weight below which low precision will do (0: never)
    float      skip_threshold = 0.0f; // a miss whose largest relative gate weight is below it is skipped (0: never)
    uint64_t   expert_bytes    = 0;
    uint64_t   expert_bytes_lo = 0;
    double     flops_per_token = 0;  // of one expert (2 x its parameters)
    cost_model cost;                 // with the expected reuse
    // Background admission: bytes of experts the link may still take for this
    // step while the compute goes on (0: none). A directly computed miss is
    // admitted into a free slot, or in place of the policy's victim when the
    // policy admits it (eviction_policy::admit; by default when it was used more
    // recently-and-often, decayed frequency, than that victim); its slot
    // becomes a hit only once the load has completed.
    uint64_t admit_bytes = 0;
};

struct step_plan {
    std::vector<planned_expert> experts;  // the distinct experts of the step, first seen first
    std::vector<expert_action>  actions;  // per expert, final (a load that found no slot is direct; SKIP: left out)
    std::vector<int32_t>        slots;    // per expert: its slot for a hit or a load (in its precision's cache), else -1
    std::vector<bool>           skipped;  // per expert: left out by skip_threshold
    std::vector<int32_t>        admitted; // indices into experts: direct now, and given a slot to fill in the background
    std::vector<int32_t>        admitted_slots;
    uint64_t                    evictions = 0;  // by loads and admissions
    uint64_t                    upgrades  = 0;  // low-precision copies given up for a high-precision load
};

class step_planner {
  public:
    explicit step_planner(int32_t n_expert);

    // Plans layer il's step: experts [n_tokens, n_used] with their weights
    // relative to each token's top-k sum. Counts the uses into the caches, pins
    // and touches hits, assigns slots to loads and admissions (evicting as the
    // policy says). Throws std::runtime_error for an expert id out of range.
    const step_plan & plan(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens,
                           int64_t n_used, expert_cache & hi, expert_cache * lo, uint64_t step, const step_config & cfg);

    // for pair ids: the action and slot of an expert of the last plan
    expert_action action_of(int32_t e) const { return plan_.actions[(size_t) index_of_[e]]; }
    int32_t       slot_of(int32_t e) const { return plan_.slots[(size_t) index_of_[e]]; }
    // pairs of the last plan that wanted high precision (weight at or above the threshold), per expert
    int32_t       hi_pairs(size_t i) const { return hi_pairs_[(size_t) plan_.experts[i].expert]; }

  private:
    int32_t              n_expert_;
    std::vector<int32_t> index_of_;  // [n_expert] -> index into plan_.experts, -1
    std::vector<int32_t> hi_pairs_;  // [n_expert]
    step_plan            plan_;
};

}  // namespace pymoe
