// The trace simulator (see pymoe-simulator.h).
#include "pymoe-simulator.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
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

cache_simulator::cache_simulator(const sim_params & p) : p_(p), planner_(p.n_expert) {
    if (p.n_layer <= 0 || p.n_expert <= 0 || p.expert_bytes == 0) {
        throw std::invalid_argument("simulator: need layers, experts and an expert size");
    }
    uint64_t budget_hi = p.budget;
    if (p.expert_bytes_lo > 0) {
        const uint64_t budget_lo = (uint64_t) (p.lo_share * (double) p.budget);
        budget_hi -= budget_lo;
        layers_lo_ = sim_layers(p.n_layer, p.n_expert, p.expert_bytes_lo);
        cache_lo_  = std::make_unique<expert_cache>(layers_lo_, p.n_expert, budget_lo,
                                                    std::vector<ggml_backend_buffer_type_t>{ ggml_backend_cpu_buffer_type() },
                                                    make_eviction_policy(p.policy, p.weights), std::vector<double>(),
                                                    false, p.per_layer);
        result_.n_slots_lo = cache_lo_->n_slots();
    }
    layers_ = sim_layers(p.n_layer, p.n_expert, p.expert_bytes);
    cache_  = std::make_unique<expert_cache>(layers_, p.n_expert, budget_hi,
                                            std::vector<ggml_backend_buffer_type_t>{ ggml_backend_cpu_buffer_type() },
                                            make_eviction_policy(p.policy, p.weights), std::vector<double>(), false,
                                            p.per_layer);
    // admission weighs what was used over the last ~32 tokens
    cache_->set_half_life(32.0 * p.n_layer);
    result_.n_slots = cache_->n_slots();
    reuse_.set_share((double) result_.n_slots / ((double) p.n_layer * (double) p.n_expert));
}

void cache_simulator::end_token() {
    result_.tokens++;
    token_time_  = now_ - token_start_;
    token_start_ = now_;
}

void cache_simulator::step(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens,
                           int64_t n_used) {
    if (il < 0 || il >= p_.n_layer) {
        throw std::invalid_argument("simulator: layer out of range");
    }
    const uint64_t     step = ++step_;
    const cost_model & cm   = p_.cost;
    // background uploads that have completed by now are hits from here on
    for (auto it = uploads_.begin(); it != uploads_.end();) {
        if (it->done_at <= now_) {
            cache_->publish(it->il, it->e);
            it = uploads_.erase(it);
        } else {
            ++it;
        }
    }
    rel_.assign(weights, weights + n_tokens * n_used);  // as the engine compares them
    relative_gate_weights(rel_.data(), n_tokens, n_used);

    step_config cfg;
    cfg.admit           = cache_->policy().admits_on_miss();
    cfg.assist          = p_.assist;
    cfg.lo_threshold    = cache_lo_ ? p_.lo_threshold : 0.0f;
    cfg.expert_bytes    = p_.expert_bytes;
    cfg.expert_bytes_lo = cache_lo_ ? p_.expert_bytes_lo : 0;
    cfg.flops_per_token = p_.flops_per_token;
    cfg.cost            = cm;
    cfg.cost.reuse      = std::max(cm.reuse, reuse_.estimate());
    if (p_.admission && p_.assist) {
        // misses are served where they are cheapest now; filling the cache for
        // later is background admission's job, off the critical path
        cfg.cost.reuse = 1.0;
        // the link may run ahead of the compute by one token's time, no more
        const double horizon = token_time_ > 0 ? token_time_ : p_.layer_seconds * p_.n_layer;
        const double idle    = horizon - std::max(0.0, link_free_at_ - now_);
        cfg.admit_bytes      = cm.read_bw > 0 ? (uint64_t) std::max(0.0, idle * cm.read_bw) : UINT64_MAX;
    }
    const step_plan & plan = planner_.plan(il, experts, rel_.data(), n_tokens, n_used, *cache_, cache_lo_.get(), step, cfg);

    plan_request req;  // for the planner's own time estimates
    req.expert_bytes    = p_.expert_bytes;
    req.expert_bytes_lo = p_.expert_bytes_lo;
    req.flops_per_token = p_.flops_per_token;
    req.cost            = cm;
    auto compute = [&](double flops_per_s, int32_t nt) {
        return flops_per_s > 0 ? nt * p_.flops_per_token / flops_per_s : 0.0;
    };
    auto link = [&](uint64_t bytes) { return cm.read_bw > 0 ? (double) bytes / cm.read_bw : 0.0; };
    double seconds = p_.layer_seconds * (double) n_tokens;
    for (size_t i = 0; i < plan.experts.size(); ++i) {
        const planned_expert & x = plan.experts[i];
        switch (plan.actions[i]) {
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
            case ACTION_LOAD_LO:
                {
                    const bool     lo    = plan.actions[i] == ACTION_LOAD_LO;
                    const uint64_t bytes = lo ? p_.expert_bytes_lo : p_.expert_bytes;
                    result_.misses++;
                    (lo ? result_.loads_lo : result_.loads)++;
                    result_.lo_pairs += lo ? (uint64_t) x.n_tokens : 0;
                    result_.bytes_moved += bytes;
                    // on the critical path, behind what the link already has queued
                    // (one copy engine: background uploads are not overtaken)
                    const double start = std::max(link_free_at_, now_ + seconds);
                    seconds += start - (now_ + seconds) + plan_load_seconds(req, x.n_tokens, lo);
                    link_free_at_ = start + link(bytes);
                    result_.link_busy_seconds += link(bytes);
                }
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
    result_.evictions += plan.evictions;
    result_.upgrades += plan.upgrades;
    for (size_t k = 0; k < plan.admitted.size(); ++k) {
        const int32_t e     = plan.experts[(size_t) plan.admitted[k]].expert;
        const double  start = std::max(now_, link_free_at_);
        link_free_at_       = start + link(p_.expert_bytes);
        uploads_.push_back({ il, e, link_free_at_ });
        result_.admissions++;
        result_.bytes_admitted += p_.expert_bytes;
        result_.link_busy_seconds += link(p_.expert_bytes);
    }
    uint64_t step_hits = 0, step_loads = 0;
    for (size_t i = 0; i < plan.experts.size(); ++i) {
        step_hits += plan.actions[i] == ACTION_HIT || plan.actions[i] == ACTION_HIT_LO;
        step_loads += plan.actions[i] == ACTION_LOAD || plan.actions[i] == ACTION_LOAD_LO;
    }
    reuse_.observe(step_hits, step_loads);
    result_.steps++;
    result_.pairs += (uint64_t) (n_tokens * n_used);
    result_.seconds += seconds;
    now_ += seconds;
}

}  // namespace pymoe
