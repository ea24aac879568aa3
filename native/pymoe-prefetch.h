// Prefetching: predict the experts of the next layers and load them in the
// background while the current layer computes.
#pragma once

#include "pymoe-expert-cache.h"
#include "pymoe-expert-store.h"
#include "pymoe-loader.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct ggml_tensor;

namespace pymoe {

enum gating_func : int32_t {  // the values of llama.cpp's llama_expert_gating_func_type
    GATING_NONE           = 0,
    GATING_SOFTMAX        = 1,
    GATING_SIGMOID        = 2,
    GATING_SOFTMAX_WEIGHT = 3,
    GATING_SQRT_SOFTPLUS  = 4,
};

// One predicted expert: its id and the largest weight it is predicted to get
// over the step's tokens (weights normalised over each token's top-k).
using predicted_expert = std::pair<int32_t, float>;

// Predicts which experts of a layer tokens will choose, from an earlier
// layer's hidden state. A wrong guess costs bandwidth, never correctness.
class expert_predictor {
  public:
    virtual ~expert_predictor() = default;

    virtual const char * name() const = 0;

    // x: [n_tokens, n_embd] float32, the hidden state some layer before `il`
    // fed its experts. Returns false when `il` cannot be predicted.
    virtual bool predict(int32_t il, const float * x, int64_t n_tokens, int32_t k,
                         std::vector<predicted_expert> & out) = 0;
};

// The top-k of a router applied to hidden states (pure; unit-tested):
// w [n_expert, n_embd] row-major (one row per expert), bias [n_expert] or null
// (added for the selection only, as DeepSeek-V3's correction bias is).
void router_topk(const float * w, const float * bias, int32_t gating, int64_t n_expert, int64_t n_embd,
                 const float * x, int64_t n_tokens, int32_t k, std::vector<predicted_expert> & out);

// "Apply layer L's router to the hidden state of layer L-1 (or earlier)":
// a strong predictor in published measurements.
class router_predictor : public expert_predictor {
  public:
    router_predictor(int32_t n_layer, int64_t n_embd);

    const char * name() const override { return "next-router"; }

    // the router of layer il, as the model holds it (any type ggml converts to float)
    void set_router(int32_t il, const ggml_tensor * gate_inp, const ggml_tensor * bias, int32_t gating);

    bool predict(int32_t il, const float * x, int64_t n_tokens, int32_t k, std::vector<predicted_expert> & out) override;

    // host memory of the float copies made of routers that could not be read in place
    // (written by the compute thread, read by stats() from any thread)
    uint64_t copied_bytes() const { return copied_bytes_.load(std::memory_order_relaxed); }

  private:
    struct router {
        const ggml_tensor * gate_inp = nullptr;
        const ggml_tensor * bias     = nullptr;
        int32_t             gating   = GATING_SOFTMAX;
        int64_t             n_expert = 0;
        std::vector<float>  w;       // float copy, made at the first prediction
        std::vector<float>  b;
    };
    int64_t             n_embd_;
    std::vector<router> routers_;
    std::atomic<uint64_t> copied_bytes_{ 0 };
};

// Prefetching as the engine runs it: the predictor, the background loader, the
// loads in flight and what the predictions got right. The engine calls it
// twice per MoE layer and step: before planning (score the predictions made for
// this layer, wait for its experts still being loaded) and after (predict the
// next layers and start their loads).
class prefetcher {
  public:
    // where predicted experts go: the high-precision cache, and with a sidecar the
    // low-precision one (a prediction weighing less than lo_threshold goes there)
    struct targets {
        expert_cache * hi       = nullptr;
        expert_store * hi_store = nullptr;
        expert_cache * lo       = nullptr;
        expert_store * lo_store = nullptr;
        float          lo_threshold = 0.0f;
    };

    // `loader`, `pending`: the engine's background loader and the slots it is
    // filling (shared with background admission)
    prefetcher(int32_t n_layer, int64_t n_embd, int32_t n_expert_used, async_loader & loader, pending_slots & pending,
               int32_t depth, int32_t max_tokens, const targets & t);

    router_predictor & predictor() { return predictor_; }
    // the experts predicted so far for layer il's next step (the routing recorder reads them)
    const std::vector<int32_t> & predicted(int32_t il) const { return predicted_[(size_t) il]; }

    // Before layer il's plan: counts the predictions made for il that were chosen
    // (`chosen`: the step's distinct experts) and waits for background loads of
    // those still in flight (the wait is exposed time); they are hits then.
    void before_plan(int32_t il, const std::vector<int32_t> & chosen, layer_stats & ls);

    // After layer il's plan: predicts layers il+1 .. il+depth from x [n_tokens,
    // n_embd] (layer il's expert input) and loads predicted experts that have no
    // slot into slots the running step does not use (pinned until loaded).
    void after_plan(int32_t il, const float * x, int64_t n_tokens, uint64_t step);

    // the background loads, evictions and bytes this prefetcher caused, per layer
    // (only the prefetch_* and evictions counters are set)
    layer_stats layer_counters(int32_t il) const;
    void        reset_counters();

  private:
    int32_t                           n_expert_used_;
    int32_t                           depth_;
    int32_t                           max_tokens_;
    targets                           t_;
    router_predictor                  predictor_;
    std::vector<std::vector<int32_t>> predicted_;  // [n_layer] experts predicted for the layer's next step
    std::vector<predicted_expert>     pred_;       // scratch
    mutable std::mutex                counters_mutex_;
    std::vector<layer_stats>          counters_;   // [n_layer]
    async_loader &                    loader_;
    pending_slots &                   pending_;
};

}  // namespace pymoe
