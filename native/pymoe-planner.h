// The planner: for one MoE layer and one ubatch, how each chosen expert is
// served. A pure function of the request, unit-tested alone.
#pragma once

#include <cstdint>
#include <vector>

namespace pymoe {

enum expert_action : int8_t {
    ACTION_HIT    = 0, // in a slot: compute from the pool
    ACTION_LOAD   = 1, // read into a slot, then compute from the pool
    ACTION_DIRECT = 2, // compute from the model's own tensors, where the weights live
};

// Measured on the machine at start-up (see engine::calibrate); 0 means "free".
struct cost_model {
    double read_bw    = 0;   // bytes/s into a slot
    double direct_bw  = 0;   // bytes/s the direct branch pays to bring an expert where it computes
    double fast_flops = 0;   // FLOP/s of the fast tier's expert matmuls
    double slow_flops = 0;   // FLOP/s where the weights live (the CPU)
    double reuse      = 1.0; // how many steps a loaded expert is expected to serve (>= 1)
};

struct planned_expert {
    int32_t expert;
    int32_t n_tokens; // pairs of this step routed to it
    float   weight;   // its summed gate weight over those pairs
    bool    cached;
};

struct plan_request {
    std::vector<planned_expert> experts;        // the distinct experts of the step
    int32_t                     capacity = 0;   // slots the step may take (not pinned by its own hits)
    bool                        admit    = true; // the policy lets a miss take a slot
    bool                        assist   = true; // the cost model may send a miss to the direct branch
    uint64_t                    expert_bytes    = 0;
    double                      flops_per_token = 0; // 2 x parameters of one expert
    cost_model                  cost;
};

// One action per entry of req.experts, in the same order. Hits stay hits;
// misses are considered by most tokens first (then weight): a miss is loaded
// while slots remain and (with assist) loading it costs no more than serving
// it directly times the expected reuse; otherwise it is served directly.
std::vector<expert_action> plan_layer(const plan_request & req);

// the time estimates behind the decision, exposed for tests and stats
double plan_load_seconds(const plan_request & req, int32_t n_tokens);
double plan_direct_seconds(const plan_request & req, int32_t n_tokens);

}  // namespace pymoe
