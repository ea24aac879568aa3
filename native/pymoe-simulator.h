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
    float            skip_threshold  = 0.0f;  // adaptive top-k (step_config): a miss below it is left out (0: never)
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
    // prefetching from recorded guesses (sim_trace::guesses): a guessed expert
    // is uploaded in the background on the same link timeline; as in the engine,
    // a step waits for the uploads of its experts still in flight (exposed time)
    // the model's layers per traced layer (a trace that logs 5 of 24 layers: 4.8):
    // a token's time, admission's horizon, includes the layers the trace lacks
    double           horizon_scale       = 1.0;
    bool             prefetch            = true;
    int32_t          prefetch_max_tokens = 4;  // larger ubatches (prefill): no admission, as in the engine
};

// A guess the engine's predictor made, recorded with the routing: at the step
// of `token`'s ubatch and layer `layer`, expert `expert` of the later layer `target`.
struct sim_guess {
    int64_t token;
    int32_t layer;
    int32_t target;
    int32_t expert;
};

// A whole routing trace: experts and gate weights [n_tokens, n_layer, k]
// (layer = the simulator's layer index; a row of -1: the token did not pass that
// layer, as llama.cpp computes only the output rows of the last one), the
// ubatches the tokens were evaluated in (sizes, in order; empty: one token
// each) and the predictor's guesses (sorted by token, then layer).
struct sim_trace {
    const int32_t *        experts = nullptr;
    const float *          weights = nullptr;
    int64_t                n_tokens = 0, n_layer = 0, k = 0;
    std::vector<int64_t>   ubatches;
    std::vector<sim_guess> guesses;
};

// The next use of every (layer, expert) of a trace, by the simulator's step
// numbers: what an offline policy (belady) may read, and only the simulator has.
class trace_future : public next_use_oracle {
  public:
    // the steps of `tr` are numbered first_step, first_step + 1 ... (ubatch-major, then layer)
    trace_future(const sim_trace & tr, int32_t n_expert, uint64_t first_step);
    uint64_t next_use(int32_t il, int32_t e, uint64_t step) const override;

  private:
    int32_t                            n_expert_;
    std::vector<std::vector<uint64_t>> uses_;  // [n_layer * n_expert] steps, ascending
};

struct sim_result {
    uint64_t tokens = 0, steps = 0, pairs = 0;
    uint64_t hits = 0, hits_lo = 0, misses = 0, loads = 0, loads_lo = 0, direct = 0, evictions = 0, upgrades = 0;
    uint64_t lo_pairs = 0, bytes_moved = 0;
    uint64_t skipped = 0, skipped_pairs = 0;  // misses left out by skip_threshold (counted as misses), their pairs
    uint64_t admissions = 0, bytes_admitted = 0;  // background uploads (not in bytes_moved: off the critical path)
    double   seconds = 0;              // modelled time of the tokens
    double   link_busy_seconds = 0;    // the link moving foreground loads and background uploads
    int32_t  n_slots = 0, n_slots_lo = 0;
    uint64_t prefetch_loads = 0, prefetch_bytes = 0;  // guessed experts uploaded in the background
    uint64_t prefetch_hits  = 0;                      // hits on a slot a prefetch filled (its first use)
    double   prefetch_wait_seconds = 0;               // steps waiting for uploads of their experts: exposed time
};

class cache_simulator {
  public:
    explicit cache_simulator(const sim_params & p);

    // One MoE layer step: experts [n_tokens, n_used] and their gate weights;
    // then the guesses made at this step are prefetched (n_guesses of them).
    void step(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens, int64_t n_used,
              const sim_guess * guesses = nullptr, size_t n_guesses = 0);
    // Counts the tokens of a ubatch (for per-token figures); call after its layers.
    void end_token(int64_t n_tokens = 1);
    // The whole trace, ubatch by ubatch, layer by layer; an offline policy
    // reads the trace's future. Throws std::invalid_argument for a bad shape.
    void run(const sim_trace & tr);

    const sim_result & result() const { return result_; }

  private:
    struct upload {
        int32_t il;
        int32_t e;
        double  done_at;  // model seconds
    };
    void prefetch(const sim_guess & g, uint64_t step, double now);

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
    bool                          prefetching_  = false;  // a trace with guesses is being run
    std::vector<uint8_t>          prefetched_;       // [n_layer * n_expert] slot filled by a prefetch, not yet used
    std::vector<int32_t>          scratch_ids_;
    std::vector<float>            scratch_w_;
};

}  // namespace pymoe
