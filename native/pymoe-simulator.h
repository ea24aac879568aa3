// The trace simulator: routing decisions recorded from a real model, replayed
// through the engine's own cache, policies and planner (not copies of them),
// with a modelled link and compute instead of real loads.
#pragma once

#include "pymoe-expert-cache.h"
#include "pymoe-planner.h"
#include "pymoe-policy.h"
#include "pymoe-step.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pymoe {

struct sim_params {
    int32_t          n_layer         = 0;
    int32_t          n_expert        = 0;
    uint64_t         expert_bytes    = 0;  // one expert, all projections, high precision
    uint64_t         expert_bytes_lo = 0;  // its low-precision copy (0: no mixed precision)
    uint64_t         budget          = 0;  // bytes of slots, both precisions
    double           lo_share        = 0.25;
    float            lo_threshold    = 0.0f;
    std::string      policy          = "lru";
    multidim_weights weights;
    bool             per_layer       = true;  // a pool per layer (else one shared by all layers)
    bool             assist          = true;
    cost_model       cost;                    // read_bw: the link; fast/slow_flops: device and CPU
    double           flops_per_token = 0;     // of one expert
    double           layer_seconds   = 0;     // everything else of a layer, per token (attention, router ...)
    // background admission (pymoe-step.h): misses computed where they live are
    // uploaded into the cache while the link is idle, at most one token's worth
    // of link time ahead; a slot is a hit once its upload has completed
    bool             admission       = true;
};

struct sim_result {
    uint64_t tokens = 0, steps = 0, pairs = 0;
    uint64_t hits = 0, hits_lo = 0, misses = 0, loads = 0, loads_lo = 0, direct = 0, evictions = 0, upgrades = 0;
    uint64_t lo_pairs = 0, bytes_moved = 0;
    uint64_t admissions = 0, bytes_admitted = 0;  // background uploads (not in bytes_moved: off the critical path)
    double   seconds = 0;              // modelled time of the tokens
    double   link_busy_seconds = 0;    // the link moving foreground loads and background uploads
    int32_t  n_slots = 0, n_slots_lo = 0;
};

class cache_simulator {
  public:
    explicit cache_simulator(const sim_params & p);

    // One MoE layer step: experts [n_tokens, n_used] and their gate weights.
    void step(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens, int64_t n_used);
    // Counts a token (for per-token figures); call once per token after its layers.
    void end_token();

    const sim_result & result() const { return result_; }

  private:
    struct upload {
        int32_t il;
        int32_t e;
        double  done_at;  // model seconds
    };

    sim_params                    p_;
    std::vector<expert_layer>     layers_;
    std::vector<expert_layer>     layers_lo_;
    std::unique_ptr<expert_cache> cache_;
    std::unique_ptr<expert_cache> cache_lo_;
    step_planner                  planner_;
    sim_result                    result_;
    reuse_estimator               reuse_;
    uint64_t                      step_ = 0;
    std::vector<float>            rel_;            // the step's weights relative to each token's top-k sum
    double                        now_          = 0; // model seconds
    double                        link_free_at_ = 0; // when the link has moved everything queued on it
    double                        token_start_  = 0;
    double                        token_time_   = 0; // the last token's modelled time: the admission horizon
    std::vector<upload>           uploads_;          // background uploads in flight
};

}  // namespace pymoe
