// Prefetching (see pymoe-prefetch.h).
#include "pymoe-prefetch.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

namespace pymoe {

void router_topk(const float * w, const float * bias, int32_t gating, int64_t n_expert, int64_t n_embd,
                 const float * x, int64_t n_tokens, int32_t k, std::vector<predicted_expert> & out) {
    out.clear();
    k = (int32_t) std::min<int64_t>(k, n_expert);
    std::vector<float>   logit((size_t) n_expert), score((size_t) n_expert), best((size_t) n_expert, -1.0f);
    std::vector<int32_t> idx((size_t) n_expert);
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float * xt = x + t * n_embd;
        for (int64_t e = 0; e < n_expert; ++e) {
            const float * we = w + e * n_embd;
            double        s  = 0.0;
            for (int64_t j = 0; j < n_embd; ++j) {
                s += (double) we[j] * xt[j];
            }
            logit[e] = (float) s;
        }
        // the gating function, then the selection bias (DeepSeek-V3 adds it to sigmoid scores)
        if (gating == GATING_SIGMOID) {
            for (int64_t e = 0; e < n_expert; ++e) {
                score[e] = 1.0f / (1.0f + std::exp(-logit[e]));
            }
        } else if (gating == GATING_SQRT_SOFTPLUS) {
            for (int64_t e = 0; e < n_expert; ++e) {
                score[e] = std::sqrt(std::log1p(std::exp(logit[e])));
            }
        } else {  // softmax (or softmax over the chosen: the order is the logits' order)
            const float mx = *std::max_element(logit.begin(), logit.end());
            double      z  = 0.0;
            for (int64_t e = 0; e < n_expert; ++e) {
                score[e] = std::exp(logit[e] - mx);
                z += score[e];
            }
            for (int64_t e = 0; e < n_expert; ++e) {
                score[e] = (float) (score[e] / z);
            }
        }
        for (int64_t e = 0; e < n_expert; ++e) {
            idx[e] = (int32_t) e;
        }
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
            const float sa = score[a] + (bias ? bias[a] : 0.0f);
            const float sb = score[b] + (bias ? bias[b] : 0.0f);
            return sa != sb ? sa > sb : a < b;
        });
        double sum = 0.0;
        for (int32_t i = 0; i < k; ++i) {
            sum += score[idx[i]];
        }
        for (int32_t i = 0; i < k; ++i) {
            const float wgt = sum > 0 ? (float) (score[idx[i]] / sum) : 1.0f / k;
            best[idx[i]]    = std::max(best[idx[i]], wgt);
        }
    }
    for (int64_t e = 0; e < n_expert; ++e) {
        if (best[e] >= 0.0f) {
            out.emplace_back((int32_t) e, best[e]);
        }
    }
}

router_predictor::router_predictor(int32_t n_layer, int64_t n_embd) : n_embd_(n_embd), routers_((size_t) n_layer) {}

void router_predictor::set_router(int32_t il, const ggml_tensor * gate_inp, const ggml_tensor * bias, int32_t gating) {
    if (il < 0 || il >= (int32_t) routers_.size() || !gate_inp || gate_inp->ne[0] != n_embd_) {
        return;
    }
    router & r = routers_[il];
    if (r.gate_inp != gate_inp) {
        r = router{ gate_inp, bias, gating, gate_inp->ne[1], {}, {} };
    }
}

namespace {

std::vector<float> to_float(const ggml_tensor * t) {
    std::vector<uint8_t> raw(ggml_nbytes(t));
    if (t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
        ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
    } else {
        std::copy((const uint8_t *) t->data, (const uint8_t *) t->data + raw.size(), raw.begin());
    }
    std::vector<float> out((size_t) ggml_nelements(t));
    if (t->type == GGML_TYPE_F32) {
        std::copy((const float *) raw.data(), (const float *) raw.data() + out.size(), out.begin());
    } else {
        const auto * traits = ggml_get_type_traits(t->type);
        if (!traits->to_float) {
            throw std::runtime_error(std::string("a router of type ") + ggml_type_name(t->type) +
                                     " cannot be read for prediction");
        }
        traits->to_float(raw.data(), out.data(), (int64_t) out.size());
    }
    return out;
}

}  // namespace

bool router_predictor::predict(int32_t il, const float * x, int64_t n_tokens, int32_t k,
                               std::vector<predicted_expert> & out) {
    if (il < 0 || il >= (int32_t) routers_.size() || !routers_[il].gate_inp) {
        return false;
    }
    router & r = routers_[il];
    // a router that is f32 in host memory (the disk and host tiers) is read in
    // place; one on a device, or quantised, is copied once as floats
    auto in_place = [](const ggml_tensor * t) -> const float * {
        const bool host = !t->buffer || ggml_backend_buffer_is_host(t->buffer);
        return host && t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) ? (const float *) t->data : nullptr;
    };
    const float * w = in_place(r.gate_inp);
    const float * b = r.bias ? in_place(r.bias) : nullptr;
    if (!w && r.w.empty()) {
        r.w = to_float(r.gate_inp);
        copied_bytes_ += r.w.size() * sizeof(float);
    }
    if (r.bias && !b && r.b.empty()) {
        r.b = to_float(r.bias);
        copied_bytes_ += r.b.size() * sizeof(float);
    }
    router_topk(w ? w : r.w.data(), b ? b : (r.b.empty() ? nullptr : r.b.data()), r.gating, r.n_expert, n_embd_, x,
                n_tokens, k, out);
    return true;
}

//
// async_loader
//

//
// prefetcher
//

prefetcher::prefetcher(int32_t n_layer, int64_t n_embd, int32_t n_expert_used, async_loader & loader,
                       pending_slots & pending, int32_t depth, int32_t max_tokens, const targets & t)
    : n_expert_used_(n_expert_used),
      depth_(depth),
      max_tokens_(max_tokens),
      t_(t),
      predictor_(n_layer, n_embd),
      predicted_((size_t) n_layer),
      counters_((size_t) n_layer),
      loader_(loader),
      pending_(pending) {}

void prefetcher::before_plan(int32_t il, const std::vector<int32_t> & chosen, layer_stats & ls) {
    std::vector<int32_t> & predicted = predicted_[il];
    if (!predicted.empty()) {
        for (int32_t e : predicted) {
            ls.prefetch_predicted++;
            ls.prefetch_correct += std::find(chosen.begin(), chosen.end(), e) != chosen.end();
        }
        for (int32_t e : chosen) {
            ls.prefetch_missed += std::find(predicted.begin(), predicted.end(), e) == predicted.end();
        }
        predicted.clear();
    }
    ls.prefetch_wait_seconds += pending_.wait(loader_, il, chosen);
}

void prefetcher::after_plan(int32_t il, const float * x, int64_t n_tokens, uint64_t step) {
    if (n_tokens > max_tokens_) {
        return;
    }
    const int32_t n_layer = (int32_t) predicted_.size();
    for (int32_t d = 1; d <= depth_; ++d) {
        const int32_t target = il + d;
        if (target >= n_layer || !t_.hi_store->layer(target)) {
            break;
        }
        if (d > 1 && !loader_.idle()) {
            break;  // look further ahead only while the link is idle
        }
        if (!predictor_.predict(target, x, n_tokens, n_expert_used_, pred_)) {
            continue;
        }
        for (const auto & [e, weight] : pred_) {
            predicted_[target].push_back(e);
            if (t_.hi->holds(target, e) >= 0 || (t_.lo && t_.lo->holds(target, e) >= 0)) {
                continue;  // already there (or on its way)
            }
            const bool     lo    = t_.lo && weight < t_.lo_threshold && t_.lo->class_of(target) >= 0;
            expert_cache & cache = lo ? *t_.lo : *t_.hi;
            expert_store & store = lo ? *t_.lo_store : *t_.hi_store;
            if (!cache.policy().admits_on_miss()) {
                continue;
            }
            bool          evicted = false;
            // never a slot this step uses; no hit until loaded
            const int32_t slot    = cache.assign(target, e, step, &evicted, /*ready=*/false);
            if (slot < 0) {
                continue;
            }
            const expert_layer & layer = *store.layer(target);
            auto done = loader_.submit(store, { target, e, cache.slot_dst(cache.class_of(target), slot, layer) },
                                       layer.expert_bytes);
            pending_.add(cache, target, e, std::move(done));
            std::lock_guard<std::mutex> lock(counters_mutex_);
            counters_[target].prefetch_loads++;
            counters_[target].prefetch_bytes += layer.expert_bytes;
            counters_[target].evictions += evicted;
        }
    }
}

layer_stats prefetcher::layer_counters(int32_t il) const {
    std::lock_guard<std::mutex> lock(counters_mutex_);
    return counters_[il];
}

void prefetcher::reset_counters() {
    std::lock_guard<std::mutex> lock(counters_mutex_);
    counters_.assign(counters_.size(), layer_stats{});
}

}  // namespace pymoe
