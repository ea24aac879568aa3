// The trace simulator (see pymoe-simulator.h).
#include "pymoe-simulator.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <stdexcept>
#include <string>

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
    prefetched_.assign((size_t) p.n_layer * (size_t) p.n_expert, 0);
    reuse_.set_share((double) result_.n_slots / ((double) p.n_layer * (double) p.n_expert));
}

namespace {

// a token row that did not pass a layer (llama.cpp computes only the output rows of the last layer)
bool absent(const sim_trace & tr, int64_t t, int64_t il) {
    return tr.experts[(t * tr.n_layer + il) * tr.k] < 0;
}

}  // namespace

trace_future::trace_future(const sim_trace & tr, int32_t n_expert, uint64_t first_step)
    : n_expert_(n_expert), uses_((size_t) tr.n_layer * (size_t) n_expert) {
    uint64_t step = first_step;
    int64_t  t0   = 0;
    for (size_t u = 0; t0 < tr.n_tokens; ++u) {
        const int64_t n = tr.ubatches.empty() ? 1 : tr.ubatches[u];
        for (int64_t il = 0; il < tr.n_layer; ++il) {
            bool stepped = false;  // as run() steps: a layer no token of the ubatch passed is no step
            for (int64_t t = t0; t < t0 + n; ++t) {
                if (absent(tr, t, il)) {
                    continue;
                }
                stepped = true;
                for (int64_t i = 0; i < tr.k; ++i) {
                    const int32_t e = tr.experts[(t * tr.n_layer + il) * tr.k + i];
                    auto &        v = uses_[(size_t) il * (size_t) n_expert + (size_t) e];
                    if (v.empty() || v.back() != step) {
                        v.push_back(step);
                    }
                }
            }
            step += stepped;
        }
        t0 += n;
    }
}

uint64_t trace_future::next_use(int32_t il, int32_t e, uint64_t step) const {
    const size_t i = (size_t) il * (size_t) n_expert_ + (size_t) e;
    if (i >= uses_.size()) {
        return k_no_next_use;
    }
    const auto & v  = uses_[i];
    const auto   it = std::upper_bound(v.begin(), v.end(), step);
    return it == v.end() ? k_no_next_use : *it;
}

void cache_simulator::end_token(int64_t n_tokens) {
    result_.tokens += (uint64_t) n_tokens;
    if (n_tokens <= p_.prefetch_max_tokens) {  // the admission horizon: a decode token's time, as the engine measures it
        token_time_ = (now_ - token_start_) / (double) n_tokens;
    }
    token_start_ = now_;
}

void cache_simulator::run(const sim_trace & tr) {
    if (tr.n_layer != p_.n_layer || tr.k <= 0 || tr.n_tokens < 0 || !tr.experts || !tr.weights) {
        throw std::invalid_argument("simulator: the trace must be [n_tokens, " + std::to_string(p_.n_layer) +
                                    " layers, k] experts and weights");
    }
    int64_t sum = 0;
    for (int64_t n : tr.ubatches) {
        if (n <= 0) {
            throw std::invalid_argument("simulator: a ubatch of " + std::to_string(n) + " tokens");
        }
        sum += n;
    }
    if (!tr.ubatches.empty() && sum != tr.n_tokens) {
        throw std::invalid_argument("simulator: the ubatches hold " + std::to_string(sum) + " tokens, the trace " +
                                    std::to_string(tr.n_tokens));
    }
    for (int64_t i = 0; i < tr.n_tokens * tr.n_layer * tr.k; ++i) {
        const bool row_absent = tr.experts[i - i % tr.k] < 0;  // a whole row of -1: the token skipped the layer
        if (row_absent ? tr.experts[i] != -1 : tr.experts[i] >= p_.n_expert) {
            throw std::invalid_argument("simulator: expert id " + std::to_string(tr.experts[i]) + " out of range [0, " +
                                        std::to_string(p_.n_expert) + ")");
        }
    }
    for (size_t i = 0; i < tr.guesses.size(); ++i) {
        const sim_guess & g = tr.guesses[i];
        if (g.token < 0 || g.token >= tr.n_tokens || g.layer < 0 || g.layer >= tr.n_layer || g.target < 0 ||
            g.target >= tr.n_layer || g.expert < 0 || g.expert >= p_.n_expert) {
            throw std::invalid_argument("simulator: guess " + std::to_string(i) + " out of range");
        }
        if (i > 0 && (g.token < tr.guesses[i - 1].token ||
                      (g.token == tr.guesses[i - 1].token && g.layer < tr.guesses[i - 1].layer))) {
            throw std::invalid_argument("simulator: the guesses must be sorted by token, then layer");
        }
    }
    std::unique_ptr<trace_future> future;
    if (cache_->policy().needs_future()) {
        future = std::make_unique<trace_future>(tr, p_.n_expert, step_ + 1);
        cache_->set_future(future.get());
        if (cache_lo_) {
            cache_lo_->set_future(future.get());
        }
    }
    prefetching_ = p_.prefetch && !tr.guesses.empty();
    size_t  g  = 0;
    int64_t t0 = 0;
    for (size_t u = 0; t0 < tr.n_tokens; ++u) {
        const int64_t n = tr.ubatches.empty() ? 1 : tr.ubatches[u];
        for (int32_t il = 0; il < (int32_t) tr.n_layer; ++il) {
            scratch_ids_.clear();
            scratch_w_.clear();
            for (int64_t t = t0; t < t0 + n; ++t) {
                const int64_t off = (t * tr.n_layer + il) * tr.k;
                if (!absent(tr, t, il)) {
                    scratch_ids_.insert(scratch_ids_.end(), tr.experts + off, tr.experts + off + tr.k);
                    scratch_w_.insert(scratch_w_.end(), tr.weights + off, tr.weights + off + tr.k);
                }
            }
            const int64_t n_step = (int64_t) scratch_ids_.size() / tr.k;
            // the guesses made at this step: those of the ubatch's tokens at this layer
            while (g < tr.guesses.size() && (tr.guesses[g].token < t0 ||
                                             (tr.guesses[g].token < t0 + n && tr.guesses[g].layer < il))) {
                ++g;
            }
            size_t g1 = g;
            while (g1 < tr.guesses.size() && tr.guesses[g1].token < t0 + n && tr.guesses[g1].layer == il) {
                ++g1;
            }
            if (n_step > 0) {
                step(il, scratch_ids_.data(), scratch_w_.data(), n_step, tr.k,
                     prefetching_ ? tr.guesses.data() + g : nullptr, prefetching_ ? g1 - g : 0);
            }
            g = g1;
        }
        end_token(n);
        t0 += n;
    }
    cache_->set_future(nullptr);
    if (cache_lo_) {
        cache_lo_->set_future(nullptr);
    }
    prefetching_ = false;
}

void cache_simulator::prefetch(const sim_guess & g, uint64_t step, double now) {
    if (cache_->holds(g.target, g.expert) >= 0 || (cache_lo_ && cache_lo_->holds(g.target, g.expert) >= 0) ||
        !cache_->policy().admits_on_miss()) {
        return;  // already there (or on its way)
    }
    bool          evicted = false;
    // never a slot this step uses; no hit until its upload has landed
    const int32_t slot    = cache_->assign(g.target, g.expert, step, &evicted, /*ready=*/false);
    if (slot < 0) {
        return;
    }
    const double secs  = p_.cost.read_bw > 0 ? (double) p_.expert_bytes / p_.cost.read_bw : 0.0;
    const double start = std::max(now, link_free_at_);
    link_free_at_      = start + secs;
    uploads_.push_back({ g.target, g.expert, link_free_at_ });
    prefetched_[(size_t) g.target * (size_t) p_.n_expert + (size_t) g.expert] = 1;
    result_.prefetch_loads++;
    result_.prefetch_bytes += p_.expert_bytes;
    result_.evictions += evicted;
    result_.link_busy_seconds += secs;
}

void cache_simulator::step(int32_t il, const int32_t * experts, const float * weights, int64_t n_tokens,
                           int64_t n_used, const sim_guess * guesses, size_t n_guesses) {
    if (il < 0 || il >= p_.n_layer) {
        throw std::invalid_argument("simulator: layer out of range");
    }
    const uint64_t     step = ++step_;
    const cost_model & cm   = p_.cost;
    // with prefetching, the step waits for the uploads of its experts still in
    // flight (the engine's prefetcher does): exposed time, then they are hits
    double wait = 0.0;
    if (prefetching_) {
        for (const upload & u : uploads_) {
            if (u.il == il && std::find(experts, experts + n_tokens * n_used, u.e) != experts + n_tokens * n_used) {
                wait = std::max(wait, u.done_at - now_);
            }
        }
        result_.prefetch_wait_seconds += wait;
    }
    // background uploads that have completed by now are hits from here on
    for (auto it = uploads_.begin(); it != uploads_.end();) {
        if (it->done_at <= now_ + wait) {
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
    cfg.skip_threshold  = p_.skip_threshold;
    cfg.expert_bytes    = p_.expert_bytes;
    cfg.expert_bytes_lo = cache_lo_ ? p_.expert_bytes_lo : 0;
    cfg.flops_per_token = p_.flops_per_token;
    cfg.cost            = cm;
    cfg.cost.reuse      = std::max(cm.reuse, reuse_.estimate());
    if (p_.admission && p_.assist && n_tokens <= p_.prefetch_max_tokens) {
        // misses are served where they are cheapest now; filling the cache for
        // later is background admission's job, off the critical path
        cfg.cost.reuse = 1.0;
        // the link may run ahead of the compute by one token's time, no more
        const double horizon = (token_time_ > 0 ? token_time_ : p_.layer_seconds * p_.n_layer) * p_.horizon_scale;
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
    double seconds = wait + p_.layer_seconds * (double) n_tokens;
    for (size_t i = 0; i < plan.experts.size(); ++i) {
        const planned_expert & x = plan.experts[i];
        switch (plan.actions[i]) {
            case ACTION_HIT:
                result_.hits++;
                if (prefetched_[(size_t) il * (size_t) p_.n_expert + (size_t) x.expert]) {
                    result_.prefetch_hits++;
                }
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
            case ACTION_SKIP:  // neither moved nor computed, as in the engine
                result_.misses++;
                result_.skipped++;
                result_.skipped_pairs += (uint64_t) x.n_tokens;
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
    for (size_t i = 0; i < plan.experts.size(); ++i) {  // a prefetch counts once: at its first use
        prefetched_[(size_t) il * (size_t) p_.n_expert + (size_t) plan.experts[i].expert] = 0;
    }
    // the guesses made at this step load in the background, behind what the link has queued
    for (size_t i = 0; i < n_guesses; ++i) {
        if (guesses[i].target > il && guesses[i].target < p_.n_layer) {
            prefetch(guesses[i], step, now_ + wait);
        }
    }
    result_.steps++;
    result_.pairs += (uint64_t) (n_tokens * n_used);
    result_.seconds += seconds;
    now_ += seconds;
}

}  // namespace pymoe
