// The trace simulator (see pymoe-simulator.h).
#include "pymoe-simulator.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <map>
#include <stdexcept>

namespace pymoe {

namespace {

// layers whose experts are `bytes` long: one I8 "projection" of that many bytes
std::vector<expert_layer> sim_layers(int32_t n_layer, int32_t n_expert, uint64_t bytes) {
    std::vector<expert_layer> out((size_t) n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        expert_proj p;
        p.kind         = PROJ_DOWN;
        p.type         = GGML_TYPE_I8;
        p.ne[0]        = (int64_t) bytes;
        p.ne[1]        = 1;
        p.ne[2]        = n_expert;
        p.expert_bytes = bytes;
        p.file_offset  = 0;
        out[il].il           = il;
        out[il].projs        = { p };
        out[il].expert_bytes = bytes;
    }
    return out;
}

}  // namespace

cache_simulator::cache_simulator(const sim_params & p) : p_(p) {
    if (p.n_layer <= 0 || p.n_expert <= 0 || p.expert_bytes == 0) {
        throw std::invalid_argument("simulator: need layers, experts and an expert size");
    }
    uint64_t budget_hi = p.budget;
    if (p.expert_bytes_lo > 0) {
        const uint64_t budget_lo = (uint64_t) (p.lo_share * (double) p.budget);
        budget_hi -= budget_lo;
        layers_lo_ = sim_layers(p.n_layer, p.n_expert, p.expert_bytes_lo);
        cache_lo_  = std::make_unique<expert_cache>(layers_lo_, p.n_expert, budget_lo, ggml_backend_cpu_buffer_type(),
                                                    make_eviction_policy(p.policy, p.weights), std::vector<double>(),
                                                    false, p.per_layer);
        result_.n_slots_lo = cache_lo_->n_slots();
    }
    layers_ = sim_layers(p.n_layer, p.n_expert, p.expert_bytes);
    cache_  = std::make_unique<expert_cache>(layers_, p.n_expert, budget_hi, ggml_backend_cpu_buffer_type(),
                                            make_eviction_policy(p.policy, p.weights), std::vector<double>(), false,
                                            p.per_layer);
    result_.n_slots = cache_->n_slots();
    reuse_.set_share((double) result_.n_slots / ((double) p.n_layer * (double) p.n_expert));
}

void cache_simulator::step(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens,
                           int64_t n_used) {
    if (il < 0 || il >= p_.n_layer) {
        throw std::invalid_argument("simulator: layer out of range");
    }
    const uint64_t step = ++step_;
    const float    thr  = cache_lo_ ? p_.lo_threshold : 0.0f;
    rel_.assign(weights, weights + n_tokens * n_used);  // as the engine compares them
    relative_gate_weights(rel_.data(), n_tokens, n_used);
    weights = rel_.data();
    // the distinct experts of the step, as the engine groups them
    std::map<int32_t, planned_expert> by_expert;
    std::map<int32_t, uint64_t>       hi_pairs;
    for (int64_t i = 0; i < n_tokens * n_used; ++i) {
        const int32_t e = experts[i];
        if (e < 0 || e >= p_.n_expert) {
            throw std::invalid_argument("simulator: expert id out of range");
        }
        auto & x = by_expert.try_emplace(e, planned_expert{ e, 0, 0.0f, false, false }).first->second;
        x.n_tokens++;
        x.weight = std::max(x.weight, weights[i]);
        hi_pairs[e] += weights[i] >= thr;
    }
    plan_request req;
    int32_t      hits = 0, hits_lo = 0;
    for (auto & [e, x] : by_expert) {
        x.cached    = cache_->lookup(il, e) >= 0;
        x.cached_lo = cache_lo_ && cache_lo_->lookup(il, e) >= 0;
        hits += x.cached;
        hits_lo += x.cached_lo;
        cache_->count(il, e, (uint64_t) x.n_tokens, hi_pairs[e]);
        if (cache_lo_) {
            cache_lo_->count(il, e, (uint64_t) x.n_tokens, hi_pairs[e]);
        }
        req.experts.push_back(x);
    }
    const int32_t c    = cache_->class_of(il);
    const int32_t c_lo = cache_lo_ ? cache_lo_->class_of(il) : -1;
    req.capacity        = (c >= 0 ? cache_->cls(c).n_slots : 0) - hits;
    req.capacity_lo     = (c_lo >= 0 ? cache_lo_->cls(c_lo).n_slots : 0) - hits_lo;
    req.admit           = cache_->policy().admits_on_miss();
    req.assist          = p_.assist;
    req.lo_threshold    = thr;
    req.expert_bytes    = p_.expert_bytes;
    req.expert_bytes_lo = cache_lo_ ? p_.expert_bytes_lo : 0;
    req.flops_per_token = p_.flops_per_token;
    req.cost            = p_.cost;
    req.cost.reuse      = std::max(p_.cost.reuse, reuse_.estimate());
    const std::vector<expert_action> actions = plan_layer(req);

    for (size_t i = 0; i < req.experts.size(); ++i) {
        if (actions[i] == ACTION_HIT) {
            cache_->touch(il, req.experts[i].expert, step);
        } else if (actions[i] == ACTION_HIT_LO) {
            cache_lo_->touch(il, req.experts[i].expert, step);
        }
    }
    const cost_model & cm = p_.cost;
    auto compute = [&](double flops_per_s, int32_t nt) {
        return flops_per_s > 0 ? nt * p_.flops_per_token / flops_per_s : 0.0;
    };
    double seconds = p_.layer_seconds * (double) n_tokens;
    for (size_t i = 0; i < req.experts.size(); ++i) {
        const planned_expert & x       = req.experts[i];
        expert_action          a       = actions[i];
        bool                   evicted = false;
        if (a == ACTION_LOAD && cache_->assign(il, x.expert, step, &evicted) < 0) {
            a = ACTION_DIRECT;
        }
        if (a == ACTION_LOAD_LO && cache_lo_->assign(il, x.expert, step, &evicted) < 0) {
            a = ACTION_DIRECT;
        }
        result_.evictions += evicted;
        switch (a) {
            case ACTION_HIT:
                result_.hits++;
                seconds += compute(cm.fast_flops, x.n_tokens);
                break;
            case ACTION_HIT_LO:
                result_.hits_lo++;
                result_.lo_pairs += (uint64_t) x.n_tokens;
                seconds += compute(cm.fast_flops, x.n_tokens);
                break;
            case ACTION_LOAD:
                result_.misses++;
                result_.loads++;
                result_.bytes_moved += p_.expert_bytes;
                seconds += plan_load_seconds(req, x.n_tokens, false);
                if (x.cached_lo) {
                    cache_lo_->release(il, x.expert);
                    result_.upgrades++;
                }
                break;
            case ACTION_LOAD_LO:
                result_.misses++;
                result_.loads_lo++;
                result_.lo_pairs += (uint64_t) x.n_tokens;
                result_.bytes_moved += p_.expert_bytes_lo;
                seconds += plan_load_seconds(req, x.n_tokens, true);
                break;
            default:
                result_.misses++;
                result_.direct++;
                if (cm.direct_bw > 0) {
                    result_.bytes_moved += p_.expert_bytes;
                }
                seconds += plan_direct_seconds(req, x.n_tokens);
                break;
        }
    }
    uint64_t step_hits = 0, step_loads = 0;
    for (size_t i = 0; i < req.experts.size(); ++i) {
        step_hits += actions[i] == ACTION_HIT || actions[i] == ACTION_HIT_LO;
        step_loads += actions[i] == ACTION_LOAD || actions[i] == ACTION_LOAD_LO;
    }
    reuse_.observe(step_hits, step_loads);
    result_.steps++;
    result_.pairs += (uint64_t) (n_tokens * n_used);
    result_.seconds += seconds;
}

}  // namespace pymoe
