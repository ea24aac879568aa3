// The expert-offload engine: one per model context.
//
// Graph side (pymoe-hook.cpp): every MoE layer's experts are built as two
// mul_mat_id branches, the layer's slot pool and the model's own (lazily
// mapped) expert tensors, each with its own persistent id tensors, summed.
// Run side: the router's weights tensor of each layer is named
// "pymoe_route-<il>"; the scheduler's eval callback stops there, and
// on_route() reads the chosen experts, plans, loads misses into slots and
// writes the id tensors before the layer's expert matmuls run.
#pragma once

#include "pymoe-expert-cache.h"
#include "pymoe-expert-store.h"
#include "pymoe-planner.h"
#include "pymoe.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

struct ggml_tensor;
struct llama_moe_hook;

namespace pymoe {

// what the graph of one MoE layer reads (persistent tensors, written by on_route)
struct layer_plan_tensors {
    ggml_tensor * ids_pool   = nullptr; // I32 [n_used, n_ctx_tokens] slot per pair, -1: not from the pool
    ggml_tensor * ids_pool_b = nullptr; // I32 [n_used, n_ctx_tokens] expert per pool pair (biases), else -1
    ggml_tensor * ids_direct = nullptr; // I32 [n_used, n_ctx_tokens] expert per direct pair, else -1
};

class engine {
  public:
    // `path` the GGUF, `n_tokens_max` the largest ubatch, `buft_fast` where the
    // slots live. Reads the expert layout, splits the budget into pools,
    // measures the read bandwidth and, for the static policy, loads the hot set.
    engine(const std::string & path, const offload_params & params, int32_t n_layer, int32_t n_expert,
           int32_t n_expert_used, int32_t n_tokens_max, ggml_backend_buffer_type_t buft_fast);
    ~engine();

    llama_moe_hook * hook() { return hook_.get(); }

    // the scheduler's eval callback (cb_eval / cb_eval_user_data = this)
    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);

    // --- graph side, called by the hook
    expert_store &             store() { return *store_; }
    expert_cache &             cache() { return *cache_; }
    const layer_plan_tensors & plan_tensors(int32_t il) const { return plan_tensors_[il]; }
    int32_t                    n_tokens_max() const { return n_tokens_max_; }
    void                       note_layer_built(int32_t il, ggml_tensor * selected, ggml_tensor * weights);

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
    void read_ids(const ggml_tensor * t, std::vector<int32_t> & out) const;
    void read_weights(const ggml_tensor * t, std::vector<float> & out) const;
    void write_ids(ggml_tensor * t, const std::vector<int32_t> & ids, int64_t n) const;
    void release_direct();

    offload_params                  params_;
    int32_t                         n_layer_;
    int32_t                         n_expert_;
    int32_t                         n_expert_used_;
    int32_t                         n_tokens_max_;
    std::unique_ptr<expert_store>   store_;
    std::unique_ptr<expert_cache>   cache_;
    struct hook_deleter {
        void operator()(llama_moe_hook * h) const;  // pymoe-hook.cpp, where the type is complete
    };
    std::unique_ptr<llama_moe_hook, hook_deleter> hook_;
    cost_model                      cost_;
    bool                            release_direct_ = true; // disk tier: keep the page cache within bounds
    bool                            started_        = false;

    ggml_context_ptr                ids_ctx_;
    ggml_backend_buffer_ptr         ids_buf_;
    std::vector<layer_plan_tensors> plan_tensors_;  // [n_layer]
    std::vector<ggml_tensor *>      route_selected_; // [n_layer] the router's outputs in the graph being run
    std::vector<ggml_tensor *>      route_weights_;

    uint64_t                                 step_ = 0;
    std::vector<uint64_t>                    replay_cursor_; // [n_layer] next trace row
    std::vector<std::pair<int32_t, int32_t>> pending_release_;
    std::string                              error_;

    // scratch of on_route, kept to avoid per-step allocations
    std::vector<int32_t> sel_;
    std::vector<float>   w_;
    std::vector<int32_t> ids_pool_, ids_pool_b_, ids_direct_;
    std::vector<int32_t> count_;
    std::vector<float>   wsum_;
    std::vector<int32_t> action_of_, slot_of_;

    mutable std::mutex          stats_mutex_;
    std::vector<layer_stats>    layer_stats_;
};

}  // namespace pymoe
