// The planner: for one MoE layer and one ubatch, how each chosen expert is
// served. A pure function of the request, unit-tested alone.
#pragma once

#include <cstdint>
#include <vector>

namespace pymoe {

enum expert_action : int8_t {
    ACTION_HIT     = 0, // a high-precision slot holds it
    ACTION_LOAD    = 1, // read it into a high-precision slot
    ACTION_DIRECT  = 2, // compute it from the model's own tensors, where the weights live
    ACTION_HIT_LO  = 3, // a low-precision slot holds it (HOBBIT)
    ACTION_LOAD_LO = 4, // read its low-precision copy into a low-precision slot
    ACTION_SKIP    = 5, // a miss of little weight left out (step_config::skip_threshold): not computed
};

// Measured on the machine (see engine::start); 0 means "free".
struct cost_model {
    double read_bw    = 0;   // bytes/s into a slot (the disk, or the host-to-device link)
    double direct_bw  = 0;   // bytes/s the direct branch pays to bring an expert where it computes
    double fast_flops = 0;   // FLOP/s of the fast tier's expert matmuls
    double slow_flops = 0;   // FLOP/s where the weights live (the CPU)
    double reuse      = 1.0; // how many steps a loaded expert is expected to serve (>= 1)
    // ubatches of at least this many tokens run the direct branch on the device
    // instead, after copying the experts it uses over the link: upstream's
    // op_offload (32 on CUDA; 0: never, e.g. the CPU or an RPC device)
    int32_t offload_min_batch = 0;
};

struct planned_expert {
    int32_t expert;
    int32_t n_tokens;  // pairs of this step routed to it
    float   weight;    // its largest gate weight among those pairs: how much it matters
    bool    cached;    // in a high-precision slot
    bool    cached_lo = false; // in a low-precision slot
    bool    loading   = false; // a background load of it is in flight: computed directly, never loaded twice
};

struct plan_request {
    std::vector<planned_expert> experts;         // the distinct experts of the step
    int32_t                     capacity    = 0; // high-precision slots the step may take (not pinned)
    int32_t                     capacity_lo = 0; // low-precision slots the step may take
    bool                        admit    = true; // the policy lets a miss take a slot
    bool                        assist   = true; // the cost model may send a miss to the direct branch
    float                       lo_threshold = 0; // relative gate weight below which low precision will do (0: never)
    uint64_t                    expert_bytes    = 0;
    uint64_t                    expert_bytes_lo = 0;
    double                      flops_per_token = 0; // 2 x parameters of one expert
    cost_model                  cost;
};

// One action per entry of req.experts, in the same order.
//  - in a high-precision slot: HIT;
//  - unimportant (weight < lo_threshold) and in a low-precision slot: HIT_LO;
//  - otherwise a miss, considered by most tokens first, then largest weight:
//    an unimportant one loads its low-precision copy while low slots remain,
//    else (or an important one) its high-precision copy while high slots
//    remain; with assist, a load must cost no more than serving the expert
//    directly times the expected reuse. What is not loaded is computed
//    directly, at high precision. An important expert held only in low
//    precision is thereby upgraded (loaded high) or served directly: low
//    precision is only ever used for unimportant pairs.
std::vector<expert_action> plan_layer(const plan_request & req);

// The weights the planner compares with lo_threshold: each pair's gate weight
// divided by the sum of its token's top-k weights (in place, w[t * n_used + i]).
// Models that normalise their top-k weights are unchanged; for those that do
// not (OLMoE, Qwen2-MoE, DeepSeek-V2) one threshold then means the same share
// of a token's output whatever the model's k and gating.
void relative_gate_weights(float * w, int64_t n_tokens, int64_t n_used);

// How many steps a loaded expert serves, learned as the run goes: 1 + the
// hits per load so far, starting from what uniform routing would give a
// cache holding `share` of the experts (share / (1 - share) hits per load).
struct reuse_estimator {
    double prior_hits  = 0.0;
    double prior_loads = 1.0;
    uint64_t hits      = 0;
    uint64_t loads     = 0;

    void   set_share(double share) { prior_hits = share >= 1.0 ? 1e9 : share / (1.0 - share); }
    void   observe(uint64_t n_hits, uint64_t n_loads) { hits += n_hits; loads += n_loads; }
    double estimate() const { return 1.0 + (prior_hits + (double) hits) / (prior_loads + (double) loads); }
};

// the time estimates behind the decision, exposed for tests and stats
double plan_load_seconds(const plan_request & req, int32_t n_tokens, bool lo = false);
double plan_direct_seconds(const plan_request & req, int32_t n_tokens);

}  // namespace pymoe
