// The expert-offload engine: one per model context.
//
// Graph side (pymoe-hook.cpp): every MoE layer's experts are built as up to
// three mul_mat_id branches, summed: the high-precision slot pool, the
// low-precision slot pool (with a sidecar) and the model's own (lazily mapped
// or host-resident) expert tensors ("direct"), each with persistent id
// tensors in which -1 means "another branch has this pair".
// Run side: the router's weights tensor of each layer is named
// "pymoe_route-<il>"; the scheduler's eval callback stops there, and
// on_route() reads the chosen experts and their weights, plans, loads misses,
// writes the id tensors, and starts background loads of the experts it
// predicts for the next layers, all before the layer's expert matmuls run.
#pragma once

#include "pymoe-expert-cache.h"
#include "pymoe-expert-store.h"
#include "pymoe-planner.h"
#include "pymoe-loader.h"
#include "pymoe-prefetch.h"
#include "pymoe-recorder.h"
#include "pymoe-step.h"
#include "pymoe-stream.h"
#include "pymoe.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <array>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

struct ggml_tensor;
struct llama_model;
struct llama_moe_hook;

namespace pymoe {

// The branches whose ids live on the layer's device, packed per token so that
// one write per layer carries the whole plan: [n_used x PLAN_DEV_COUNT] per token.
enum plan_branch : int32_t {
    PLAN_POOL    = 0, // high-precision slot per pair, -1: another branch
    PLAN_POOL_B  = 1, // the expert of each such pair (biases), else -1
    PLAN_LO      = 2, // low-precision slot per pair, -1: another branch
    PLAN_LO_B    = 3,
    PLAN_DEV_COUNT = 4,
};

// what the graph of one MoE layer reads: persistent I32 tensors written by
// on_route (never graph inputs: the scheduler copies inputs when a split starts,
// before the callback has written them); the graph views the first n_tokens columns
struct layer_plan_tensors {
    ggml_tensor * ids_dev    = nullptr; // [n_used * n_branches, n_tokens_max] on the layer's device
    int32_t       n_branches = 0;       // 2 (the high pool) or 4 (and the low pool, with a sidecar)
    ggml_tensor * ids_direct = nullptr; // [n_used, n_tokens_max] in host memory (the CPU reads it):
                                        // the expert of each direct pair, else -1
    ggml_tensor * skip_scale = nullptr; // F32 [n_used, n_tokens_max] on the layer's device, with skipping
                                        // renormalised only: what each pair's output is multiplied by
};

// what the hook saw of a layer when it built the graph being run
struct layer_route_tensors {
    ggml_tensor * selected = nullptr; // I32 [n_used, n_tokens]
    ggml_tensor * weights  = nullptr; // F32 [1, n_used, n_tokens]
    ggml_tensor * input    = nullptr; // F32 [n_embd, 1, n_tokens]: what the experts (and the predictor) see
};

// Everything the hook tells the engine about one MoE layer of the graph it
// built: the engine's one entry point from graph building (the hook itself
// only builds graph).
struct built_layer {
    int32_t             il = -1;
    layer_route_tensors route;
    const uint8_t *     expert_data[PROJ_COUNT] = {};  // where llama.cpp placed each projection's experts (host)
    ggml_tensor *       expert_tensors[PROJ_COUNT] = {}; // the model's expert tensors (the CPU's calibration runs on them)
    const ggml_tensor * gate_inp    = nullptr;         // the router [n_embd, n_expert], for the predictor
    const ggml_tensor * exp_probs_b = nullptr;         // its selection bias, or null
    int32_t             gating      = 0;               // llama_expert_gating_func_type
};

// The device each layer of a loaded model runs on (null: the CPU); pymoe-hook.cpp
// reads it from llama.cpp's layer placement.
std::vector<ggml_backend_dev_t> model_layer_devices(const llama_model * model);

using clock_type = std::chrono::steady_clock;

class engine {
  public:
    // `path` the GGUF, `n_tokens_max` the largest ubatch, `layer_dev[il]` the
    // device layer il runs on (null: the CPU; its slots are then host memory).
    // Reads the expert layout (and the sidecar's), splits the budget into pools
    // on the layers' devices; measuring and a static hot set wait for start().
    engine(const std::string & path, const offload_params & params, int32_t n_layer, int32_t n_expert,
           int32_t n_expert_used, int64_t n_embd, int32_t n_tokens_max, int32_t n_threads,
           const std::vector<ggml_backend_dev_t> & layer_dev);
    ~engine();

    llama_moe_hook * hook() { return hook_.get(); }

    // the scheduler's eval callback (cb_eval / cb_eval_user_data = this)
    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);

    // --- graph side: what the hook reads, and its one call
    const expert_layer *       layer(int32_t il) const { return store_->layer(il); }
    const expert_cache &       cache() const { return *cache_; }
    const expert_cache *       cache_lo() const { return cache_lo_.get(); }
    const layer_plan_tensors & plan_tensors(int32_t il) const { return plan_tensors_[il]; }
    int32_t                    n_tokens_max() const { return n_tokens_max_; }
    // the hook built layer v.il into the graph about to run
    void                       on_layer_built(const built_layer & v);

    // --- run side
    void on_route(int32_t il);
    // after each llama_decode: drop the direct branch's pages, and rethrow a
    // failure that the callback had to swallow (the step then fell back to the
    // direct branch, which is always correct)
    void end_batch();

    offload_stats stats() const;
    void          reset_stats();

  private:
    void start();  // at the first sync point, when every layer's tensors are known: calibrate, load a hot set
    void     plan_step(int32_t il, int64_t n_used, int64_t n_tokens, uint64_t step, layer_stats & ls,
                       double & load_seconds);
    bool     admission_active(int64_t n_tokens) const;  // background admission serves this step
    uint64_t admission_budget(int64_t n_tokens) const;  // bytes background admission may queue now
    cost_model calibrate() const;                       // the cost model, measured on this machine
    void read_ids(const ggml_tensor * t, std::vector<int32_t> & out) const;
    void read_weights(const ggml_tensor * t, std::vector<float> & out) const;
    void read_input(const ggml_tensor * t, std::vector<float> & out) const;
    void write_plan(int32_t il, int64_t n_pairs);
    void release_direct();
    void stream_layer(int32_t il, int64_t n_tokens);  // the stream reads this layer's direct experts
    void finish_stream();           // and is done with the previous layer's

    offload_params                  params_;
    int32_t                         n_layer_;
    int32_t                         n_expert_;
    int32_t                         n_expert_used_;
    int64_t                         n_embd_;
    int32_t                         n_tokens_max_;
    int32_t                         n_threads_;  // the CPU's, for calibration
    std::unique_ptr<expert_store>   store_;
    std::unique_ptr<expert_cache>   cache_;
    std::unique_ptr<expert_store>   store_lo_;   // the sidecar
    std::unique_ptr<expert_cache>   cache_lo_;
    std::unique_ptr<expert_stream>  stream_;     // disk tier: the direct branch's experts, read ahead of the CPU
    std::vector<ggml_backend_ptr>   upload_backends_;  // the engine's own instance of each device holding pools
    std::unique_ptr<async_loader>   loader_;           // background loads: prefetching and admission
    pending_slots                   pending_;          // slots those loads are filling
    std::unique_ptr<prefetcher>     prefetcher_;       // with prefetching on
    std::unique_ptr<routing_recorder> recorder_;       // --record-routing (reads the prefetcher's guesses)
    step_planner                    planner_;
    bool                            device_pools_  = false; // some pools live in device memory
    double                          token_seconds_ = 0;     // a decode token's time, measured (admission's horizon)
    clock_type::time_point          last_first_step_;       // the first MoE layer's last sync point
    int32_t                         first_moe_layer_ = -1;
    std::vector<double>             flops_per_token_;       // [n_layer] of one expert
    std::vector<std::array<ggml_tensor *, PROJ_COUNT>> expert_tensors_;  // [n_layer] the model's, once built
    struct hook_deleter {
        void operator()(llama_moe_hook * h) const;  // pymoe-hook.cpp, where the type is complete
    };
    std::unique_ptr<llama_moe_hook, hook_deleter> hook_;
    cost_model                      cost_;
    reuse_estimator                 reuse_;
    bool                            release_direct_ = true; // disk tier: keep the page cache within bounds
    bool                            started_        = false;

    std::vector<ggml_backend_buffer_type_t> layer_buft_;  // [n_layer] where each layer's slots and pool ids live
    std::vector<ggml_context_ptr>        ids_ctx_;         // one per buffer type
    std::vector<ggml_backend_buffer_ptr> ids_buf_;
    std::vector<layer_plan_tensors>      plan_tensors_;    // [n_layer]
    std::vector<int32_t>                 packed_;          // scratch: the device branches' ids, per token
    std::vector<layer_route_tensors> route_;         // [n_layer]

    uint64_t                                 step_ = 0;
    std::vector<uint64_t>                    replay_cursor_; // [n_layer] next trace row
    std::vector<std::pair<int32_t, int32_t>> pending_release_;
    std::string                              error_;

    // scratch of on_route, kept to avoid per-step allocations
    std::vector<int32_t> sel_;
    std::vector<float>   w_;
    std::vector<float>   x_;
    std::vector<int32_t> ids_pool_, ids_pool_b_, ids_lo_, ids_lo_b_, ids_direct_;
    std::vector<float>   skip_scale_;
    std::vector<int32_t> chosen_;
    std::vector<int32_t> direct_experts_;

    mutable std::mutex       stats_mutex_;
    mutable std::mutex       cache_mutex_;  // the caches' use counters: written while planning, read by stats()
    std::vector<layer_stats> layer_stats_;
};

}  // namespace pymoe
